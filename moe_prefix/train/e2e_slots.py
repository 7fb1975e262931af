"""E2E slot matching: which values of a meaning representation a text realises, and the slot error rate.

A meaning representation (MR) is a list of slots, written `name[Blue Spice], eatType[pub]` (the E2E
challenge's files) or `name: Blue Spice, eatType: pub` (the copy this repository reads). A text realises
a slot when it states the slot's value in one of the wordings people use for it, and no other value of that
slot; it mentions a slot wrongly when it states another value of that slot (a pub called a coffee shop, "not
family-friendly" for familyFriendly[yes], also beside the right one: listing every value wins nothing) or
states a slot the MR does not have (a price the MR never gave). Following Dušek et al. (2019, "Semantic
Noise Matters for Neural Natural Language Generation"):

    SER = (missing + wrong + added) / slots in the MR

and over a corpus the errors and slots are summed before the division. `wrong` and `added` together are the
slots a text mentions wrongly. Names (`name`, `near`) are open sets: a missing name is an error, another
venue's name is not detected. Slots outside the E2E ontology are matched by their value's words.

Text and values are compared lower-cased, with accents dropped (Café = Cafe) and hyphens read as spaces
(family-friendly = family friendly). Before the closed-set slots are read, the MR's own names are blanked
out of the text, so "Raja Indian Cuisine" (a venue) is not read as food[Indian], nor "Rainbow Vegetarian
Café" as a coffee shop.

A slot written in the MR's own syntax (`familyFriendly: yes`, `near[The Sorrento]`, `name: Blue Spice`) is
not realised: such fragments are blanked out first. Copying the input is thus no way to a low SER, which
matters once SER is a reward: a policy trained on -SER learnt to write `familyFriendly: yes` (issue 13).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache

NAME_SLOTS = ("name", "near")  # open sets: realised by their value's words, never "wrong"

# Wordings per value of the closed-set slots, as regular expressions over normalised text (lower case, no
# accents, hyphens as spaces). A slot's value is realised when one of its patterns matches and no pattern of
# another value of the slot does; it is wrong when another value's pattern matches.
_RATING_CUE = r"(?:customer )?(?:rating|ratings|rated|reviews?|stars?)"
_RATING_IS = r"(?:(?:of|is|as|are|that is|which is|being) )?(?:an? |very |quite |really )?"  # "rating that is high"
ONTOLOGY: dict[str, dict[str, tuple[str, ...]]] = {
    "eatType": {
        "coffee shop": (r"coffee ?shops?", r"coffee (?:house|place|bar)", r"cafe"),
        "pub": (r"pubs?",),
        "restaurant": (r"restaurants?", r"eatery", r"diner", r"bistro"),
    },
    "area": {
        "riverside": (r"river ?side", r"(?:by|on|near|along|beside|at) the river", r"river"),
        "city centre": (
            r"city cent(?:re|er)",
            r"(?:town|the) cent(?:re|er)",
            r"cent(?:re|er) of (?:the )?(?:city|town)",
            r"downtown",
            r"centre",
            r"center",
        ),
    },
    "familyFriendly": {
        # Negated wordings come first: the matcher reads "no" before "yes" so "not family friendly" is no.
        "no": (
            r"(?:not|no|non|never|nor|\w*n't) (?:very |a |an |really |so |too |that )?"
            r"(?:family|kids?|child|children) ?(?:friendly|oriented|orientated)",
            r"(?:family|kids?|child|children) (?:un ?friendly|unfriendly)",
            r"adults? only",
            r"no (?:kids|children|families|family)",
            r"not (?:suitable|good|ideal|recommended|appropriate|welcoming|conducive|for) (?:\w+ ){0,2}"
            r"(?:kids|children|families|family|child)",
            r"(?:\w*n't|does not|do not) (?:\w+ ){0,2}(?:kids|children|families|child)",
        ),
        "yes": (
            r"(?:family|kids?|child|children) ?(?:friendly|oriented|orientated)",
            r"(?:good|great|suitable|ideal|perfect|fun) for (?:\w+ ){0,2}(?:kids|children|families|family|child)",
            r"welcom\w* (?:\w+ ){0,2}(?:kids|children|families|family)",
            r"(?:kids|children|families|whole family|entire family) (?:are )?welcome",
            r"(?:bring|take) (?:\w+ ){0,2}(?:kids|children|family)",
        ),
    },
    "priceRange": {
        "cheap": (
            r"cheap\w*",
            r"inexpensive",
            r"low(?: ?cost| ?priced?| prices?| price range)",
            r"afford\w*",
            r"budget",
            r"(?:less than|under|below) (?:£ ?)?20",
        ),
        "moderate": (
            r"moderate\w*",
            r"average(?: ?priced?| prices?| price range)",
            r"mid(?:dle)?(?: range| ?priced?| prices?)",
            r"reasonabl\w* pric\w*",
            r"(?:£ ?)?20 ?(?:to|-|–)? ?(?:£ ?)?25",
        ),
        "high": (
            r"high(?: ?cost| ?priced?| prices?| price range| end)",
            r"expensive",
            r"pric(?:ey|y)",
            r"costly",
            r"upscale",
            r"(?:more than|over|above) (?:£ ?)?30",
        ),
    },
    "customer rating": {
        "low": (
            rf"low(?:ly)? {_RATING_CUE}",
            rf"{_RATING_CUE} {_RATING_IS}(?:low|bad|poor)",
            rf"(?:poor|bad)(?:ly)? {_RATING_CUE}",
            r"(?:1|one) out of (?:5|five)",
            r"(?<!out of )(?:1|one) stars?",
        ),
        "average": (
            rf"average {_RATING_CUE}",
            rf"{_RATING_CUE} {_RATING_IS}average",
            r"(?:3|three) out of (?:5|five)",
            r"(?<!out of )(?:3|three) stars?",
        ),
        "high": (
            rf"high(?:ly)? {_RATING_CUE}",
            rf"{_RATING_CUE} {_RATING_IS}high(?:ly)?",
            rf"(?:excellent|great|top) {_RATING_CUE}",
            r"(?:5|five) out of (?:5|five)",
            r"(?<!out of )(?:5|five) stars?",
        ),
    },
    "food": {
        "English": (r"english", r"british"),
        "French": (r"french",),
        "Italian": (r"italian",),
        "Japanese": (r"japanese", r"sushi"),
        "Chinese": (r"chinese",),
        "Fast food": (r"fast ?food", r"burgers?", r"fries"),
        "Indian": (r"indian", r"curr(?:y|ies)"),
    },
}
# The same value in other words (E2E writes one band of prices and ratings two ways).
ALIASES = {
    "priceRange": {"less than £20": "cheap", "£20-25": "moderate", "more than £30": "high"},
    "customer rating": {"1 out of 5": "low", "3 out of 5": "average", "5 out of 5": "high"},
}
# Keys as the E2E files spell them, read case- and space-insensitively (familyfriendly, customerRating).
_KEYS = {re.sub(r"[\s_]", "", k.lower()): k for k in (*NAME_SLOTS, *ONTOLOGY)}
_SLOT_BRACKETS = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]\s*(?:,|$)")
# A key in MR syntax inside normalised text: `familyfriendly: yes` (up to the next , . or ;) or `near[...]`.
_KEY_WORDS = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", k).lower() for k in (*NAME_SLOTS, *ONTOLOGY)]  # eatType: eat type
_MR_FRAGMENT = re.compile(
    r"\b(?:" + "|".join(w.replace(" ", " ?") for w in _KEY_WORDS) + r")\s*(?::[^,.;]*|\[[^\]]*\])"
)


def normalise(text: str) -> str:
    """Lower case, accents dropped, hyphens and slashes as spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[-‐–—/]", " ", text)
    text = text.replace("’", "'")
    return re.sub(r"\s+", " ", text).strip()


def parse_mr(mr: str) -> list[tuple[str, str]] | None:
    """[(key, value)] of `k[v], ...` or `k: v, ...`; None when the text is not an MR (then no SER exists).

    Keys of the E2E ontology come back in its spelling (`familyFriendly`, `customer rating`).
    """
    text = mr.strip()
    if not text:
        return None
    if "[" in text:
        slots = _SLOT_BRACKETS.findall(text)
        if not slots or _SLOT_BRACKETS.sub("", text).strip():
            return None
    else:
        slots = []
        for part in text.split(","):
            key, colon, value = part.partition(":")
            if not colon or not key.strip() or not value.strip():
                return None
            slots.append((key, value))
    return [(_KEYS.get(re.sub(r"[\s_]", "", k.lower()), k.strip()), v.strip()) for k, v in slots]


@dataclass
class SlotCheck:
    """What one text does with one MR's slots (keys listed)."""

    slots: int
    missing: list[str] = field(default_factory=list)  # not stated at all
    wrong: list[str] = field(default_factory=list)  # stated with another value
    added: list[str] = field(default_factory=list)  # stated although the MR has no such slot

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.wrong) + len(self.added)

    @property
    def ser(self) -> float:
        """Slot error rate of this text, a fraction (may exceed 1 when many slots are added)."""
        return self.errors / max(self.slots, 1)


@cache
def _compiled(key: str, value: str) -> re.Pattern:
    patterns = ONTOLOGY[key][value]
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


def _canonical(key: str, value: str) -> str | None:
    """The ontology's value for an MR value (`less than £20` -> `cheap`), None when it has none."""
    value = ALIASES.get(key, {}).get(value, value)
    for known in ONTOLOGY[key]:
        if normalise(known) == normalise(value):
            return known
    return None


@cache
def _words_pattern(value: str) -> re.Pattern:
    """A name or other open value: its words in order; a leading "the" optional."""
    words = normalise(value)
    words = words[4:] if words.startswith("the ") else words
    return re.compile(r"\b" + re.escape(words).replace(r"\ ", r"\s+") + r"\b")


def _mentions(text: str, key: str) -> list[str]:
    """The values of closed slot `key` that the text states; familyFriendly reads "no" first (negation)."""
    found = []
    for value in ONTOLOGY[key]:
        pattern = _compiled(key, value)
        if pattern.search(text):
            found.append(value)
            if key == "familyFriendly":
                text = pattern.sub(" ", text)  # "not family friendly" must not also count as "family friendly"
    return found


def check_slots(text: str, mr: str | list[tuple[str, str]]) -> SlotCheck:
    """Which slots of the MR the text misses, states wrongly or adds (see the module docstring)."""
    slots = parse_mr(mr) if isinstance(mr, str) else mr
    if slots is None:
        raise ValueError(f"not a meaning representation: {mr!r}")
    norm = _MR_FRAGMENT.sub(" ", normalise(text))  # MR syntax copied into the text realises nothing
    check = SlotCheck(len(slots))
    # Names first, blanked out of the text, so that what they contain is not read as another slot.
    for key, value in slots:
        if key in ONTOLOGY:
            continue
        pattern = _words_pattern(value)
        if not pattern.search(norm):
            check.missing.append(key)
        elif key in NAME_SLOTS:
            norm = pattern.sub(" ", norm)
    given = {key for key, _ in slots}
    for key, value in slots:
        if key not in ONTOLOGY:
            continue
        canonical = _canonical(key, value)
        stated = _mentions(norm, key)
        if canonical is None:  # a value outside the ontology: only its own words count
            if not _words_pattern(value).search(norm):
                check.missing.append(key)
        elif stated == [canonical]:
            continue
        elif stated:  # another value, or the right one beside another (a text cannot win by listing them all)
            check.wrong.append(key)
        else:
            check.missing.append(key)
    for key in ONTOLOGY:
        if key not in given and _mentions(norm, key):
            check.added.append(key)
    return check


def slot_error_rate(texts: list[str], mrs: list[str]) -> float:
    """Corpus SER, a fraction: all texts' errors over all their MRs' slots (Dušek et al. 2019)."""
    checks = [check_slots(t, mr) for t, mr in zip(texts, mrs, strict=True)]
    return sum(c.errors for c in checks) / max(sum(c.slots for c in checks), 1)


def all_parse(mrs: list[str]) -> bool:
    """Whether every input is an MR (then a generation run reports val/ser)."""
    return bool(mrs) and all(parse_mr(mr) is not None for mr in mrs)
