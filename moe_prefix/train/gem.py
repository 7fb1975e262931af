"""GEM data-to-text sources from the pinned BIG-bench artefact, alone or mixed as `gem4`.

BIG-bench 1.0.0 ships samples of four GEM evaluation sets (Gehrmann et al. 2021) as
`benchmark_tasks/gem/<name>/task.json`, rows {input, target (a string or a list), comment}:

| source | rows | distinct inputs | input -> output |
|---|---|---|---|
| e2e_nlg | 1,000 | 213 | restaurant attributes -> description (one reference a row, several rows an input) |
| webnlg_en | 1,001 | 1,001 | RDF triples -> sentences (a list of references, 2.9 on average) |
| common_gen | 500 | 499 | a concept set -> a sentence using them all (4.1 references) |
| schema_guided_dialog | 1,000 | 1,000 | dialogue acts + the conversation so far -> the system's turn |

There is no training split: `data.split_by_input` splits the distinct inputs with data.split_seed, each
source on its own (so every source keeps val_fraction of its inputs), and inputs that share a reference
(28 generic dialogue turns such as "Is there anything else I can help with?") stay on one side together.

Every source keeps its own prompt, BIG-bench's own prefixes from the task file (`example_input_prefix`,
`example_output_prefix`): "There is a restaurant with the following attributes: ...\\nDescribe the
restaurant:". The prompt is the record's `prompt`; data.prompt_format wraps it like a bare input.

The caps, for the CPU budget (prompt tokens measured with the SmolLM2 tokenizer, median / 95th
percentile / longest; docs/gem4.md): a schema_guided_dialog input carries the whole conversation so far
(244 / 549 / 805 tokens); its dialogue acts (what the turn has to say) stay whole, and of the conversation
only the last turns within SGD_HISTORY_WORDS words, cut at a turn boundary, the latest turn always
(79 / 145 / 198; inputs that become equal merge: 996 distinct). webnlg_en inputs of 5 to 7 triples
(245 of 1,001; up to 255 tokens) are left out: WEBNLG_MAX_TRIPLES keeps 756 inputs of 1 to 4 triples
(at most 156 tokens).

`gem4` holds all four, the source as the record's `group` (per-source metrics, oracle routing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import assets

GEM_SOURCES = ("e2e_nlg", "webnlg_en", "common_gen", "schema_guided_dialog")  # group names, in this order
GEM_PART = "gem_bigbench"  # the artefact all four tasks come from
# datasets that read that artefact: gem4 mixes the sources, each other name is one source alone
# (the plain alias e2e_nlg stays its own artefact and format: the studies before gem4 used it)
GEM_DATASETS = ("gem4", *GEM_SOURCES[1:])
SGD_HISTORY_WORDS = 24  # conversation words kept after the dialogue acts of a schema_guided_dialog input
WEBNLG_MAX_TRIPLES = 4  # webnlg_en inputs with more triples are left out
_HISTORY = "The conversation so far has been for following:"  # sic, BIG-bench's wording
_TURN = re.compile(r'(?=\b(?:user|response): ")')


class GemError(ValueError):
    """A BIG-bench GEM task file that cannot be read as expected."""


def cap_dialogue(text: str, max_words: int | None = None) -> str:
    """A schema_guided_dialog input with its conversation cut to the last turns within max_words words
    (default SGD_HISTORY_WORDS, read at call time); the latest turn stays even when it alone is longer."""
    max_words = SGD_HISTORY_WORDS if max_words is None else max_words
    acts, sep, history = text.partition(_HISTORY)
    if not sep:
        return text
    turns = [t.strip() for t in _TURN.split(history) if t.strip()]
    kept: list[str] = []
    words = 0
    for turn in reversed(turns):  # the latest turns are what the reply answers
        n = len(turn.split())
        if kept and words + n > max_words:
            break
        kept.insert(0, turn)
        words += n
    return f"{acts}{sep} {' '.join(kept)}".strip()


def count_triples(text: str) -> int:
    """Triples in a WebNLG input `(s | p | o), (s | p | o)`."""
    return text.count(" | ") // 2


def read_gem_task(path: Path, source: str) -> list[dict]:
    """Records {id, input, targets, group, prompt} of one task file, one per distinct input (first-seen order)."""
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise GemError(f"{path}: cannot read a BIG-bench task ({err})") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise GemError(f"{path}: expected a BIG-bench task with a non-empty 'examples' list")
    before = task.get("example_input_prefix", "").strip()
    after = task.get("example_output_prefix", "").strip()
    grouped: dict[str, list[str]] = {}
    for i, example in enumerate(examples):
        target = example.get("target") if isinstance(example, dict) else None
        targets = [target] if isinstance(target, str) else target
        text = example.get("input") if isinstance(example, dict) else None
        if not isinstance(text, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise GemError(f"{path}: example {i} needs a string 'input' and a string (or list of strings) 'target'")
        if source == "schema_guided_dialog":
            text = cap_dialogue(text)
        if source == "webnlg_en" and count_triples(text) > WEBNLG_MAX_TRIPLES:
            continue
        references = grouped.setdefault(text, [])
        references += [t for t in dict.fromkeys(targets) if t not in references]  # a repeated reference adds nothing
    return [
        {
            "id": f"{source}-{i}",
            "input": text,
            "targets": targets,
            "group": source,
            "prompt": f"{before} {text}\n{after}".strip(),
        }
        for i, (text, targets) in enumerate(grouped.items())
    ]


def load_gem(name: str) -> list[dict]:
    """Records of `gem4` (all four sources, in GEM_SOURCES order) or of one source (webnlg_en, ...)."""
    if name not in GEM_DATASETS:
        raise GemError(f"{name!r} is not a built-in GEM dataset; choose one of {', '.join(GEM_DATASETS)}")
    folder = assets.resolve_parts(name)[GEM_PART]
    sources = GEM_SOURCES if name == "gem4" else (name,)
    return [record for source in sources for record in read_gem_task(folder / source / "task.json", source)]
