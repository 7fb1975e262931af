"""Runs that train nothing (model.method=none) and their few-shot prompts: demonstrations from the training split
of the input's own source only, a stated rule when they do not fit, and the run directory of a trained run."""

import csv
import json

import pytest
from test_gem import gem_cache  # noqa: F401  (a fixture: a cache holding a fake BIG-bench GEM artefact)

from moe_prefix.train import data as data_io
from moe_prefix.train import few_shot, gem
from moe_prefix.train.engine import evaluate_run, fit
from moe_prefix.train.run_config import ConfigError, load_config


class CharTokenizer:
    """One id per character: a prompt's ids spell its text back exactly."""

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def _text(ids):
    return "".join(map(chr, ids))


def _cfg(*extra):
    base = ["model.task=generation", "model.method=none", "data.source=gem4", "data.few_shot=3"]
    return load_config(None, [*base, "model.max_length=4000", "generation.max_new_tokens=8", *extra])


def _split(seed=0):
    return data_io.split_by_input(data_io.load_generation_records("gem4"), 0.3, seed)


def test_demonstrations_come_from_the_training_inputs_of_the_same_source(gem_cache):  # noqa: F811
    train, val = _split()
    cfg = _cfg()
    ids, kept = few_shot.few_shot_prompts(val, train, cfg, CharTokenizer())
    assert kept == [3] * len(val)
    train_shots = {
        s: {few_shot.demonstration(r, "{input}\n") for r in train if r["group"] == s} for s in gem.GEM_SOURCES
    }
    chosen = {}
    for record, prompt in zip(val, ids, strict=True):
        text = _text(prompt)
        *demos, own = text.split(few_shot.SEPARATOR)
        assert own == f"{record['prompt']}\n"  # the input's own prompt comes last, as without demonstrations
        demos = [d + few_shot.SEPARATOR for d in demos]
        assert len(demos) == 3 and set(demos) <= train_shots[record["group"]], record["id"]
        assert record["input"] not in text.removesuffix(own)  # never the evaluated input
        assert not any(t in text.removesuffix(own) for t in record["targets"])  # nor one of its references
        chosen.setdefault(record["group"], set()).add(tuple(demos))
    assert all(len(c) == 1 for c in chosen.values())  # one set of demonstrations per source
    assert len({c.pop() for c in chosen.values()}) == len(gem.GEM_SOURCES)
    # drawn with split_seed alone: the run's seed changes nothing, another split_seed other demonstrations
    assert few_shot.few_shot_prompts(val, train, _cfg("seed=7"), CharTokenizer())[0] == ids
    assert few_shot.few_shot_prompts(val, train, _cfg("data.split_seed=5"), CharTokenizer())[0] != ids


def test_demonstrations_that_do_not_fit_are_dropped_earliest_first(gem_cache):  # noqa: F811
    train, val = _split()
    full, _ = few_shot.few_shot_prompts(val, train, _cfg(), CharTokenizer())
    record, longest = max(zip(val, full, strict=True), key=lambda pair: len(pair[1]))
    demos = _text(longest).split(few_shot.SEPARATOR)[:-1]
    last_two = len(longest) - len(demos[0]) - len(few_shot.SEPARATOR)  # the prompt without its first demonstration
    cfg = _cfg(f"model.max_length={last_two + 8}")  # room for the last two demonstrations and the new tokens
    with pytest.warns(UserWarning, match="keep fewer demonstrations"):
        ids, kept = few_shot.few_shot_prompts([record], train, cfg, CharTokenizer())
    assert kept == [2] and _text(ids[0]) == _text(longest)[len(demos[0]) + len(few_shot.SEPARATOR) :]
    tight = _cfg(f"model.max_length={last_two + 7}")
    with pytest.warns(UserWarning):
        assert few_shot.few_shot_prompts([record], train, tight, CharTokenizer())[1] == [1]
    alone = _cfg("model.max_length=9")  # not even the input fits: it keeps no demonstration and is cut as before
    with pytest.warns(UserWarning):
        ids, kept = few_shot.few_shot_prompts([record], train, alone, CharTokenizer())
    assert kept == [0] and _text(ids[0]) == f"{record['prompt']}\n"


def test_too_few_training_inputs_of_a_source_is_named(gem_cache):  # noqa: F811
    train, val = _split()
    with pytest.raises(ConfigError, match="data.few_shot=9 needs 9 training inputs of every source; e2e_nlg has"):
        few_shot.few_shot_prompts(val, train, _cfg("data.few_shot=9"), CharTokenizer())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.few_shot=2", "model.task=generation", "data.source=e2e_nlg"], "model.method=none"),
        (["data.few_shot=-1"], "data.few_shot must be >= 0"),
        (["model.method=none"], "model.task=generation"),
        (
            ["model.method=none", "model.task=generation", "data.source=e2e_nlg", "optim.objective=rft"],
            "trains nothing",
        ),
        (["model.method=none", "model.task=generation", "data.source=e2e_nlg", "model.init_from=x"], "drop model.init"),
        (
            ["model.method=none", "model.task=generation", "data.source=e2e_nlg", "data.few_shot=1"]
            + ["model.max_length=48", "generation.max_new_tokens=48"],
            "raise model.max_length",
        ),
    ],
)
def test_untrained_and_few_shot_configs_fail_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _untrained_run(tiny_lm_dir, run_dir, *extra):
    values = {
        "model.backbone": tiny_lm_dir,
        "model.task": "generation",
        "model.method": "none",
        "model.max_length": 64,
        "data.source": "gem4",
        "data.val_fraction": 0.3,
        "data.few_shot": 2,
        "data.eval_batch_size": 4,
        "generation.max_new_tokens": 4,
        "trainer.max_steps": 50,  # ignored: nothing trains
        "trainer.enable_progress_bar": False,
        "run_dir": run_dir,
    }
    return fit(load_config(None, [*(f"{k}={v}" for k, v in values.items()), *extra]))


def test_untrained_run_writes_the_metrics_and_table_of_a_trained_one_and_is_deterministic(
    gem_cache,  # noqa: F811
    tiny_lm_dir,
    tmp_path,
):
    with pytest.warns(UserWarning, match="keep fewer demonstrations"):  # 64 tokens hold few demonstrations
        result = _untrained_run(tiny_lm_dir, tmp_path / "run")
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "adapter.safetensors", "routing.csv", "samples.jsonl"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["trainable_params"] == 0 and metrics["train_time_s"] == 0
    assert {"val/loss", "val/bleu_macro", "val/rougeL_macro", "val/ser/e2e_nlg", "val/coverage/common_gen"} <= set(
        metrics
    )
    with open(run / "routing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["id", "group", "input_len", "loss", "new_tokens", "bleu", "rougeL", "ser", "slots", "coverage"]
    assert list(rows[0]) == [*header, "demonstrations"]  # a trained run's columns (no routing), then the count
    assert {r["group"] for r in rows} == set(gem.GEM_SOURCES)
    assert metrics["val/demonstrations"] == pytest.approx(sum(int(r["demonstrations"]) for r in rows) / len(rows))
    assert all(int(r["input_len"]) <= 64 - 4 for r in rows)
    assert 0 < metrics["val/demonstrations"] <= 2
    # another seed repeats the run exactly (demonstrations drawn with split_seed, greedy decoding, no training)
    with pytest.warns(UserWarning):
        again = _untrained_run(tiny_lm_dir, tmp_path / "again", "seed=3").run_dir
    assert (again / "routing.csv").read_text() == (run / "routing.csv").read_text()
    assert json.loads((again / "metrics.json").read_text()) == metrics
    # evaluate reads it back like any finished run (its adapter file holds no tensor)
    with pytest.warns(UserWarning):
        evaluated = evaluate_run(run).metrics
    assert evaluated == pytest.approx({k: v for k, v in metrics.items() if k.startswith("val/")})


@pytest.mark.slow  # a fit and an evaluation
def test_zero_shot_untrained_run_equals_the_bare_backbone_of_evaluate(gem_cache, tiny_lm_dir, tmp_path):  # noqa: F811
    """model.method=none without demonstrations is what `evaluate --no-prefix` scores on a trained run's split."""
    untrained = _untrained_run(tiny_lm_dir, tmp_path / "none", "data.few_shot=0").metrics
    trained = _untrained_run(
        tiny_lm_dir, tmp_path / "prefix", "data.few_shot=0", "model.method=prefix", "trainer.max_steps=2"
    )
    assert trained.metrics["steps"] > 0
    bare = evaluate_run(trained.run_dir, no_prefix=True).metrics
    assert {k: v for k, v in untrained.items() if k.startswith("val/")} == pytest.approx(bare)
