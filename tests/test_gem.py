"""The built-in GEM sources and gem4: records, prompts, caps, and a split that leaks no input or reference."""

import json

import pytest

from moe_prefix.train import assets, gem
from moe_prefix.train import data as data_io
from moe_prefix.train.generation import subsample_sources

DIALOGUE = (
    'The assistant signals "inform" with the values "$36.00" for "price_per_day". '
    "The conversation so far has been for following: "
    'user: "one two three four five six seven eight nine ten". response: "eleven twelve thirteen". '
    'user: "Is it cheap?".'
)


def _task(examples, before="", after=""):
    return {"examples": examples, "example_input_prefix": before, "example_output_prefix": after}


def _fake_tasks() -> dict[str, dict]:
    e2e = [
        {"input": f"name: R{i}, area: riverside", "target": f"R{i} is by the river, take {j}."}
        for i in range(6)
        for j in range(3)
    ]
    web = [{"input": f"(A{i} | p | B{i})", "target": [f"A{i} p B{i}.", f"B{i} is p of A{i}."]} for i in range(8)]
    web.append({"input": "(a | p | b), (b | p | c), (c | p | d), (d | p | e), (e | p | f)", "target": ["long"]})
    cg = [
        {"input": f"dog frisbee c{i}", "target": [f"A dog catches a frisbee {i}.", f"Generic {i // 2}."]}
        for i in range(8)
    ]
    sgd = [
        {"input": DIALOGUE.replace("36", str(i)), "target": "Anything else?" if i % 3 else f"It costs {i}."}
        for i in range(9)
    ]
    return {
        "e2e_nlg": _task(e2e, "\nThere is a restaurant with the following attributes: ", "\nDescribe the restaurant: "),
        "webnlg_en": _task(web, "\nTriples: ", "\nSentence: "),
        "common_gen": _task(cg, "\nConcepts: ", "\nSentence: "),
        "schema_guided_dialog": _task(sgd, "\nPrompt: ", "\nresponse: "),
    }


@pytest.fixture
def gem_cache(tmp_path, monkeypatch):
    """A cache that already holds the gem_bigbench part, so nothing is downloaded."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    for source, task in _fake_tasks().items():
        folder = tmp_path / gem.GEM_PART / source
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(json.dumps(task))
    return tmp_path


def test_gem4_records_carry_source_prompt_and_all_references(gem_cache):
    records = data_io.load_generation_records("gem4")
    assert [r["group"] for r in records] == sorted(
        (r["group"] for r in records), key=gem.GEM_SOURCES.index
    )  # sources in GEM_SOURCES order
    e2e = [r for r in records if r["group"] == "e2e_nlg"]
    assert len(e2e) == 6 and all(len(r["targets"]) == 3 for r in e2e)  # one reference per row, grouped by input
    first = e2e[0]
    assert (
        first["prompt"]
        == f"There is a restaurant with the following attributes: {first['input']}\nDescribe the restaurant:"
    )
    assert len({r["id"] for r in records}) == len(records)
    assert data_io.load_generation_records("webnlg_en") == [r for r in records if r["group"] == "webnlg_en"]


def test_gem_caps_long_inputs(gem_cache):
    records = data_io.load_generation_records("gem4")
    web = [r["input"] for r in records if r["group"] == "webnlg_en"]
    assert len(web) == 8 and max(map(gem.count_triples, web)) <= gem.WEBNLG_MAX_TRIPLES  # the 5-triple input is gone
    capped = gem.cap_dialogue(DIALOGUE, max_words=5)
    assert capped.startswith('The assistant signals "inform"')  # the acts stay whole
    assert capped.endswith('for following: user: "Is it cheap?".')  # the latest turn within 5 words
    assert "eleven" in gem.cap_dialogue(DIALOGUE, max_words=8) and "one two" not in gem.cap_dialogue(DIALOGUE, 8)
    assert gem.cap_dialogue(DIALOGUE, max_words=0).endswith('user: "Is it cheap?".')  # never cut to no turn


@pytest.mark.parametrize("seed", range(5))
def test_gem4_split_leaks_no_input_and_no_reference(gem_cache, seed):
    records = data_io.load_generation_records("gem4")
    train, val = data_io.split_by_input(records, 0.3, seed)
    assert len(train) + len(val) == len(records)
    assert not {r["input"] for r in train} & {r["input"] for r in val}
    # "Anything else?" and "Generic 0." ... are shared by several inputs: they must all sit on one side
    assert not {t for r in train for t in r["targets"]} & {t for r in val for t in r["targets"]}
    for source in gem.GEM_SOURCES:  # each source keeps part of its inputs on each side
        assert any(r["group"] == source for r in train) and any(r["group"] == source for r in val)


def test_split_without_groups_or_shared_references_is_the_plain_input_split():
    """E2E on its own (no groups, no shared references) splits exactly as before gem4."""
    records = [{"input": f"in{i}", "targets": [f"t{i}a", f"t{i}b"]} for i in range(20)]
    train, val = data_io.split_by_input(records, 0.25, 3)
    _, val_idx = data_io._split_indices(20, 0.25, 3)
    assert [r["input"] for r in val] == [f"in{i}" for i in val_idx]


def test_subsample_sources_draws_equally_from_each_source():
    records = [{"input": f"{g}{i}", "group": g} for g, n in (("a", 3), ("b", 10), ("c", 10)) for i in range(n)]
    kept = subsample_sources(records, 12, seed=0)
    counts = {g: sum(r["group"] == g for r in kept) for g in "abc"}
    assert counts == {"a": 3, "b": 5, "c": 4} or counts == {"a": 3, "b": 4, "c": 5}
    assert subsample_sources(records, 12, seed=0) == kept  # seeded
    assert subsample_sources(records, None, seed=0) == records


def test_gem_sources_are_generation_data(gem_cache):
    with pytest.raises(data_io.DataError, match="model.task=generation"):
        data_io.load_examples("gem4")


@pytest.mark.slow
def test_real_gem4_split_leaks_nothing():
    """The pinned artefact: counts after the caps, and no input or reference on both sides."""
    records = data_io.load_generation_records("gem4")
    counts = {s: sum(r["group"] == s for r in records) for s in gem.GEM_SOURCES}
    assert counts == {"e2e_nlg": 213, "webnlg_en": 756, "common_gen": 499, "schema_guided_dialog": 996}
    for seed in range(3):
        train, val = data_io.split_by_input(records, 0.2, seed)
        assert not {r["input"] for r in train} & {r["input"] for r in val}
        assert not {t for r in train for t in r["targets"]} & {t for r in val for t in r["targets"]}


def tiny_gem4_overrides(tiny_lm_dir, run_dir, **extra) -> list[str]:
    """A gem4 run of 2 steps on the tiny Llama, as `key=value` overrides; extra: more or other values."""
    values = {
        "model.backbone": tiny_lm_dir,
        "model.task": "generation",
        "model.max_length": 48,
        "data.source": "gem4",
        "data.val_fraction": 0.3,
        "data.batch_size": 4,
        "data.eval_batch_size": 4,
        "prefix.num_experts": 3,
        "prefix.prefix_len": 2,
        "prefix.top_k": 2,
        "prefix.init_std": 0.5,  # a prefix that draws attention from the start
        "generation.max_new_tokens": 3,
        "trainer.max_steps": 2,
        "trainer.max_epochs": 5,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "run_dir": run_dir,
    }
    return [f"{k}={v}" for k, v in (values | extra).items()]


def test_gem4_fit_routes_by_source_and_reports_per_source_scores(gem_cache, tiny_lm_dir, tmp_path):
    """A tiny gem4 run with oracle routing: every source goes to an expert of its own; routing.csv holds the
    source and the per-example scores, whose means are the corpus ROUGE-L and coverage of the metrics."""
    import csv

    from moe_prefix.train.engine import fit
    from moe_prefix.train.run_config import load_config

    extra = {
        "prefix.num_experts": 4,
        "prefix.router_input": "group",
        "prefix.router_init": "by_group",
        "prefix.top_k": 1,
        "prefix.balanced_routing": False,
        "generation.max_new_tokens": 4,
        "trainer.limit_val_batches": 0,
    }
    result = fit(load_config(None, tiny_gem4_overrides(tiny_lm_dir, tmp_path / "run", **extra)))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    with open(result.run_dir / "routing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["group"] for r in rows} == set(gem.GEM_SOURCES)
    experts = {}
    for source in gem.GEM_SOURCES:
        experts[source] = {r["experts"] for r in rows if r["group"] == source}
        assert len(experts[source]) == 1, source  # routed by the source alone
        assert f"val/bleu/{source}" in metrics
    # sources sorted by name, as the groups are: source g on expert g, after training as before it
    assert [experts[s] for s in sorted(gem.GEM_SOURCES)] == [{"0"}, {"1"}, {"2"}, {"3"}]
    assert metrics["val/dead_experts"] == 0
    assert metrics["val/bleu_macro"] == pytest.approx(sum(metrics[f"val/bleu/{s}"] for s in gem.GEM_SOURCES) / 4)
    assert metrics["val/rougeL"] == pytest.approx(sum(float(r["rougeL"]) for r in rows) / len(rows), abs=1e-3)
    cg = [float(r["coverage"]) for r in rows if r["group"] == "common_gen"]
    assert metrics["val/coverage/common_gen"] == pytest.approx(sum(cg) / len(cg), abs=1e-3)
    assert all(r["ser"] != "" for r in rows if r["group"] == "e2e_nlg")
    assert all(r["ser"] == "" for r in rows if r["group"] != "e2e_nlg")
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["source"] for s in samples} == set(gem.GEM_SOURCES)  # every source shown, not E2E only


@pytest.mark.parametrize("sweep_file", ["gem4_smollm2.yaml", "gem4_gemma3.yaml"])
def test_every_gem4_study_arm_trains_a_step_on_a_tiny_backbone(gem_cache, tiny_lm_dir, tmp_path, sweep_file):
    """Each arm of the gem4 studies (k-means start with one expert, oracle routing, LoRA, ...) runs end to end on a
    tiny Llama: an arm that only fails at run time would otherwise fail hours into the study."""
    from pathlib import Path

    from moe_prefix.tools.ablate import load_sweep
    from moe_prefix.train.engine import fit
    from moe_prefix.train.run_config import load_config

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "ablations" / sweep_file)
    tiny = [
        f"model.backbone={tiny_lm_dir}",
        "model.max_length=64",
        "data.max_train_examples=null",
        "data.max_val_examples=8",
        "generation.max_new_tokens=2",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    for arm, overrides in sweep.arms.items():
        cfg = load_config(sweep.base, [*sweep.overrides, *overrides, *tiny, f"run_dir={tmp_path / arm}"])
        metrics = json.loads((fit(cfg).run_dir / "metrics.json").read_text())
        assert sweep.metric in metrics and metrics["steps"] == (0 if arm in sweep.once else 2), arm


def test_router_features_read_the_source_gem4_records_carry(gem_cache, tiny_lm_dir, tmp_path):
    """`router-features` on gem4 (data.group_column unset, as configs/gem4_*.yaml have it): the groups are the
    records' sources; WebNLG alone has one group, which the command names instead of computing an NMI of nothing."""
    from moe_prefix.tools.router_features import group_separation, markdown_table
    from moe_prefix.train.run_config import ConfigError, load_config

    overrides = tiny_gem4_overrides(tiny_lm_dir, tmp_path / "run", **{"data.group_column": "null"})
    cfg = load_config(None, overrides)
    rows = group_separation(cfg, seeds=1)
    assert [r["router_input"] for r in rows][0] == "embeddings"
    assert all(0 <= r["nmi_mean"] <= 1 and 0 <= r["linear_accuracy"] <= 1 for r in rows)
    assert "groups (the source of each record)" in markdown_table(rows, cfg, 1)
    with pytest.raises(ConfigError, match="fewer than two"):
        group_separation(load_config(None, [*overrides, "data.source=webnlg_en"]))
