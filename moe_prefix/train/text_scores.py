"""Scores of generated texts against several references, per example and per corpus.

Why our own BLEU: a paired test across runs needs a score per example, and the corpus figure should be
what those per-example numbers add up to. BLEU is a function of n-gram statistics summed over the corpus
(Papineni et al. 2002), so each example keeps its statistics (`BleuStats`); their sum gives corpus BLEU,
each alone gives sentence BLEU. Both follow SacreBLEU (Post 2018) exactly, checked against it in the tests:
13a tokenisation, n-gram counts clipped by the most generous reference, the brevity penalty from the
reference length closest to the hypothesis (the shorter one on a tie), SacreBLEU's default `exp`
smoothing, and for sentence BLEU the effective order (`BleuStats.score`).

ROUGE-L is torchmetrics' (LCS F-measure, best reference per example, no stemming); its corpus figure is
the mean over examples. CommonGen concept coverage (Lin et al. 2020) is the share of an input's concepts
that the text uses, a concept counting when one of its word forms appears.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

MAX_ORDER = 4

# SacreBLEU's 13a tokeniser (mteval-v13a): punctuation split off, except periods and commas inside numbers
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(text: str) -> list[str]:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in _ENTITIES:
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, repl in _13A_RULES:
        text = pattern.sub(repl, text)
    return text.split()


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(tokens) - n + 1))


@dataclass
class BleuStats:
    """Sufficient statistics of BLEU; they add up over examples."""

    matches: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)  # clipped n-gram matches, n = 1..4
    totals: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)  # hypothesis n-grams
    hyp_len: int = 0
    ref_len: int = 0  # the reference length closest to the hypothesis

    def __add__(self, other: BleuStats) -> BleuStats:
        return BleuStats(
            [a + b for a, b in zip(self.matches, other.matches, strict=True)],
            [a + b for a, b in zip(self.totals, other.totals, strict=True)],
            self.hyp_len + other.hyp_len,
            self.ref_len + other.ref_len,
        )

    def score(self, effective_order: bool = False) -> float:
        """BLEU, 0-100, as SacreBLEU computes it: `exp` smoothing (the k-th zero n-gram precision counts as
        1 / (2^k total)), 0 when nothing matches. effective_order (SacreBLEU's sentence_bleu): a hypothesis
        shorter than n words averages over the orders it has; else such an order scores 0 (corpus BLEU)."""
        if self.hyp_len == 0 or not any(self.matches):
            return 0.0
        logs, zeros = [], 0
        for m, t in zip(self.matches, self.totals, strict=True):
            if t == 0:
                if effective_order:
                    break
                return 0.0
            if m == 0:
                zeros += 1
                logs.append(math.log(1 / (2**zeros * t)))
            else:
                logs.append(math.log(m / t))
        bp = 1.0 if self.hyp_len >= self.ref_len else math.exp(1 - self.ref_len / self.hyp_len)
        return 100 * bp * math.exp(sum(logs) / len(logs))


def bleu_stats(hypothesis: str, references: list[str]) -> BleuStats:
    """One example's BLEU statistics against all its references."""
    hyp = tokenize_13a(hypothesis)
    refs = [tokenize_13a(r) for r in references]
    if not refs:
        raise ValueError("an example needs at least one reference")
    # clip each n-gram by its largest count in any one reference
    ceiling: Counter = Counter()
    for ref in refs:
        ceiling |= _ngrams(ref)
    counts = _ngrams(hyp)
    stats = BleuStats(hyp_len=len(hyp))
    for gram, count in counts.items():
        stats.matches[len(gram) - 1] += min(count, ceiling[gram])
    stats.totals = [max(len(hyp) - n, 0) for n in range(MAX_ORDER)]
    # closest reference length; ties go to the shorter one
    stats.ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return stats


def corpus_bleu(stats: list[BleuStats]) -> float:
    total = BleuStats()
    for s in stats:
        total = total + s
    return total.score()


def rouge_l(predictions: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F-measure (0-100) of each prediction against its best reference."""
    from torchmetrics.functional.text import rouge_score

    return [
        100 * float(rouge_score(p, refs, rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"])
        for p, refs in zip(predictions, references, strict=True)
    ]


# -- CommonGen concept coverage ------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def _forms(concept: str) -> set[str]:
    """Word forms that realise a concept: the word and its regular inflections (dog: dogs; run: runs, running)."""
    c = concept.lower()
    forms = {c, c + "s", c + "es", c + "ed", c + "d", c + "ing", c + "er"}
    if c.endswith("e"):
        forms |= {c[:-1] + "ing", c[:-1] + "er"}
    if c.endswith("y"):
        forms |= {c[:-1] + "ies", c[:-1] + "ied"}
    if len(c) > 2 and c[-1] not in "aeiouwxy" and c[-2] in "aeiou" and c[-3] not in "aeiou":
        forms |= {c + c[-1] + "ing", c + c[-1] + "ed", c + c[-1] + "er"}  # run: running, stop: stopped
    return forms


def parse_concepts(text: str) -> list[str]:
    """A CommonGen input (`concepts: dog, frisbee, catch, throw`, or the bare list) -> its concepts."""
    text = text.split(":", 1)[1] if ":" in text else text
    return [c.strip().lower() for c in re.split(r"[,\s]+", text) if c.strip()]


def concept_coverage(text: str, concepts: list[str]) -> float:
    """Share (0-1) of the concepts the text uses in one of their forms; irregular forms (ran, children) miss."""
    if not concepts:
        return float("nan")
    words = set(_WORD.findall(text.lower()))
    return sum(bool(_forms(c) & words) for c in concepts) / len(concepts)
