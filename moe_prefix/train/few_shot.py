"""Few-shot prompts for generation runs that train nothing (`model.method=none`, `data.few_shot=k`).

The bare backbone's fair baseline is in-context learning (Brown et al. 2020): k solved examples before the
input. The demonstrations come from the run's training inputs only (the split is by input, so none is a
validation input or shares its references), k per source, drawn with `data.split_seed` and not with the run's
seed: every seed would draw the same ones, so such a run is deterministic (greedy decoding, frozen weights).
Every validation input of a source gets the same k demonstrations, each written as that source's own prompt
(`data.prompt_format` around the record's prompt, as the input itself) followed by its first reference:

    <demo 1 prompt>\\n<demo 1 reference>\\n\\n<demo 2 prompt>\\n...\\n\\n<input prompt>\\n

The rule when they do not fit: a few-shot prompt is at most `model.max_length - generation.max_new_tokens`
tokens, so the decoded text always has its room; the demonstrations farthest from the input are dropped first,
one at a time, until the prompt fits (the count kept is each validation row's `demonstrations`). An input too
long even alone is cut as without demonstrations.
"""

from __future__ import annotations

import random
import warnings

from .run_config import ConfigError, RunConfig

SEPARATOR = "\n\n"  # after a demonstration's reference: a blank line, which single-line decoding never reaches


def choose_demonstrations(train_records: list[dict], k: int, seed: int) -> dict[str | None, list[dict]]:
    """k training records per source (`group`; None for data without sources), drawn with `seed`."""
    by_source: dict[str | None, list[dict]] = {}
    for record in train_records:
        by_source.setdefault(record.get("group"), []).append(record)
    chosen = {}
    for source, pool in by_source.items():
        if len(pool) < k:
            raise ConfigError(
                f"data.few_shot={k} needs {k} training inputs of every source; {source or 'the data'} has "
                f"{len(pool)}: lower data.few_shot or raise data.max_train_examples"
            )
        chosen[source] = random.Random(f"{seed}-{source}").sample(pool, k)  # a string seed: the same in every process
    return chosen


def demonstration(record: dict, prompt_format: str) -> str:
    """One solved example: the record's prompt as the input's own, then its first reference."""
    return prompt_format.format(input=record.get("prompt", record["input"])) + record["targets"][0] + SEPARATOR


def few_shot_prompts(records: list[dict], train_records: list[dict], cfg: RunConfig, tokenizer):
    """Token ids of each record's few-shot prompt and how many demonstrations it kept (see the module's rule)."""
    d = cfg.data
    k = d.few_shot
    budget = cfg.model.max_length - cfg.generation.max_new_tokens
    shots = {
        source: [demonstration(r, d.prompt_format) for r in chosen]
        for source, chosen in choose_demonstrations(train_records, k, d.split_seed).items()
    }
    inputs = {r["input"] for r in train_records}
    ids, kept = [], []
    for record in records:
        if record["input"] in inputs:  # the split guarantees it cannot happen; a demonstration must never be the answer
            raise ConfigError(f"few-shot: validation input {record['input']!r} is also a training input")
        demos = shots.get(record.get("group"), [])
        prompt = d.prompt_format.format(input=record.get("prompt", record["input"]))
        for j in range(len(demos), -1, -1):  # drop the earliest demonstrations until the prompt fits
            tokens = tokenizer("".join(demos[len(demos) - j :]) + prompt)["input_ids"]
            if len(tokens) <= budget or j == 0:
                break
        ids.append(tokens)
        kept.append(j)
    short = sum(j < k for j in kept)
    if short:
        warnings.warn(
            f"data.few_shot={k}: {short} of {len(records)} validation prompts keep fewer demonstrations (mean "
            f"{sum(kept) / len(kept):.2f}) to fit model.max_length={cfg.model.max_length} minus "
            f"generation.max_new_tokens={cfg.generation.max_new_tokens}; the earliest are dropped first",
            stacklevel=2,
        )
    return ids, kept
