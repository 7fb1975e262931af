"""Sweep runner: resumable after a kill, summaries with intervals and paired tests; baselines train."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_overrides
from omegaconf import OmegaConf
from scipy.stats import binomtest, bootstrap, permutation_test

from moe_prefix.analysis.stats import holm
from moe_prefix.tools.ablate import Sweep, load_sweep, plan, run_sweep, summarise, sweep_from_grid, time_left
from moe_prefix.tools.ablate_summary import seed_test_floor
from moe_prefix.train import run_dir as rd
from moe_prefix.train.engine import fit
from moe_prefix.train.run_config import ConfigError, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_summary_of_known_results(tmp_path, capsys):
    sweep = Sweep(None, {"ref": [], "better": ["prefix.top_k=1"]}, seeds=[0, 1, 2, 3], reference="ref")
    for run in plan(sweep, tmp_path):
        run.run_dir.mkdir(parents=True)
        acc = 0.8 + 0.01 * run.seed + (0.05 if run.arm == "better" else 0.0)
        metrics = {"val/acc": acc, "trainable_params": 10, "train_time_s": 1.0}
        (run.run_dir / "metrics.json").write_text(json.dumps(metrics))
    summary = summarise(sweep, tmp_path)
    rows = {line.split(",")[0]: line.split(",") for line in (tmp_path / "summary.csv").read_text().splitlines()}
    assert float(rows["better"][5]) == pytest.approx(0.05)  # diff vs reference
    # Every seed improves: the exact sign-flip test gives 2 / 2^4 = 0.125 two-sided.
    assert float(rows["better"][6]) == pytest.approx(0.125)
    assert float(rows["ref"][2]) == pytest.approx(0.815)
    assert "| better | 4 |" in summary.read_text()
    # ... which is all 4 seeds can give: the summary says so, and that 0.05 needs 6 seeds for one tested arm.
    assert "with 4 seeds the smallest attainable p is 0.125, 0.125 after Holm over 1 arm: no arm can" in (
        summary.read_text()
    )
    assert "(6 seeds can)" in summary.read_text()
    assert (tmp_path / "summary.png").is_file()
    run_sweep(sweep, tmp_path)  # every run done: the runner only says what its seeds allow, and summarises
    assert "0 to go\nseed-level test: with 4 seeds the smallest attainable p is 0.125" in capsys.readouterr().out


@pytest.mark.parametrize(("seeds", "family"), [(5, 2), (7, 2), (8, 6), (4, 1), (16, 3)])
def test_seed_test_floor_is_holm_of_the_best_sign_flip_outcome(seeds, family):
    """The floor equals Holm over `family` arms that all reach the test's best outcome (every seed one-signed,
    scipy's exact permutation test), and the seed count it asks for is the first that clears 0.05."""
    a = np.arange(1.0, seeds + 1)
    best = permutation_test(
        (a, np.zeros(seeds)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
    ).pvalue
    corrected = holm([best] * family).min()
    text = seed_test_floor(seeds, family)
    assert f"smallest attainable p is {best:.3g}, {corrected:.3g} after Holm" in text
    if corrected < 0.05:
        assert "no arm can" not in text
    else:
        needed = int(text.rsplit("(", 1)[1].split()[0])
        assert family * 2.0**-needed * 2 < 0.05 <= family * 2.0 ** -(needed - 1) * 2


def _write_run(run_dir: Path, acc: float, right: list[bool] | None, reverse: bool = False) -> None:
    """metrics.json, and a routing.csv whose example i is predicted right where right[i] (None: no labels)."""
    run_dir.mkdir(parents=True)
    (run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/acc": acc, "trainable_params": 10, "train_time_s": 1.0}))
    if right is None:  # a generation run: routing.csv without label columns
        rows = [{"id": f"e{i}", "loss": 0.5, "input_len": 4} for i in range(20)]
    else:
        rows = [
            {"id": f"e{i}", "label": i % 2, "prediction": i % 2 if ok else 1 - i % 2, "loss": 0.5, "input_len": 4}
            for i, ok in enumerate(right)
        ]
    with open(run_dir / rd.ROUTING_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[::-1] if reverse else rows)  # rows join on the id, not on their order


def _summary_rows(out_dir: Path) -> dict[str, dict]:
    with open(out_dir / "summary.csv", newline="") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_summary_example_level_mcnemar_pools_matched_seeds(tmp_path):
    arms = {"ref": [], "better": ["prefix.top_k=1"], "same": ["prefix.top_k=2"]}
    sweep = Sweep(None, arms, seeds=[0, 1, 2], reference="ref")
    right = {  # of 20 validation examples per seed
        "ref": [i < 10 for i in range(20)],
        "better": [i < 16 for i in range(20)],  # 6 more right per seed, none fewer: 18 / 0 over 3 seeds
        "same": [2 <= i < 12 for i in range(20)],  # 2 more (10, 11) and 2 fewer (0, 1) per seed: 6 / 6
    }
    for run in plan(sweep, tmp_path):
        _write_run(run.run_dir, sum(right[run.arm]) / 20, right[run.arm], reverse=run.arm == "same")
    summary = summarise(sweep, tmp_path)
    rows = _summary_rows(tmp_path)
    better, same = rows["better"], rows["same"]
    assert (better["pairs"], better["only_arm"], better["only_ref"]) == ("60", "18", "0")
    assert (same["only_arm"], same["only_ref"]) == ("6", "6")
    p_better, p_same = binomtest(18, 18).pvalue, binomtest(6, 12).pvalue
    assert float(better["p_example"]) == pytest.approx(p_better, rel=1e-12)
    assert float(same["p_example"]) == pytest.approx(p_same) == 1.0
    expected_holm = holm([p_better, p_same])
    assert [float(better["p_example_holm"]), float(same["p_example_holm"])] == pytest.approx(expected_holm)
    assert rows["ref"]["p_example"] == "nan" and rows["ref"]["pairs"] == "0"
    assert float(better["p"]) == 0.25  # three seeds: the seed-level test cannot go lower
    assert "| 60 | 18 / 0 | 7.6e-06 | 1.5e-05 |" in summary.read_text()  # 2 / 2**18; Holm: twice that


def test_summary_example_level_is_nan_without_labelled_routing(tmp_path):
    arms = {"ref": [], "gen": ["prefix.top_k=1"], "lost": ["prefix.top_k=2"]}
    sweep = Sweep(None, arms, seeds=[0, 1], reference="ref")
    for run in plan(sweep, tmp_path):
        _write_run(run.run_dir, 0.5 + 0.1 * run.seed, None if run.arm != "lost" else [True] * 20)
        if run.arm == "lost":
            (run.run_dir / rd.ROUTING_FILE).unlink()  # a run directory from before routing.csv existed
    summarise(sweep, tmp_path)
    rows = _summary_rows(tmp_path)
    for arm in ("gen", "lost"):
        assert rows[arm]["pairs"] == "0"
        assert rows[arm]["p_example"] == rows[arm]["p_example_holm"] == "nan"
        assert rows[arm]["p"] == "1.0"  # the seed-level columns are unaffected
    assert "| gen | 2 |" in (tmp_path / "summary.md").read_text()


def _write_generation_run(run_dir: Path, bleu: float, scores: dict[str, list[float]]) -> None:
    """metrics.json and a generation routing.csv with per-example score columns (empty cells: undefined)."""
    run_dir.mkdir(parents=True)
    (run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/bleu": bleu, "trainable_params": 10, "train_time_s": 1}))
    n = len(next(iter(scores.values())))
    rows = [
        {"id": f"e{i}", "group": "src", "input_len": 4, "loss": 0.5, "new_tokens": 3}
        | {k: "" if np.isnan(v[i]) else v[i] for k, v in scores.items()}
        for i in range(n)
    ]
    with open(run_dir / rd.ROUTING_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[::-1])  # joined on the id


def test_summary_pairs_generation_examples_on_their_scores(tmp_path):
    """Generation: the sign-flip test on per-example sentence-BLEU differences pooled over matched seeds, Holm
    across arms; ser counts lower as better; examples without a score (SER of a non-E2E input) are left out."""
    rng = np.random.default_rng(0)
    sweep = Sweep(
        None, {"ref": [], "up": ["prefix.top_k=1"], "noise": ["prefix.top_k=2"]}, seeds=[0, 1], reference="ref"
    )
    sweep.overrides = ["model.task=generation", "data.source=e2e_nlg"]
    base = {s: rng.uniform(10, 60, 15) for s in sweep.seeds}
    shift = {"ref": 0.0, "up": 4.0, "noise": 0.0}
    scores = {}
    for run in plan(sweep, tmp_path):
        bleu = base[run.seed] + shift[run.arm] + (rng.normal(0, 3, 15) if run.arm != "ref" else 0)
        ser = np.where(np.arange(15) < 5, 100 - bleu, np.nan)  # defined on the first 5 examples only
        scores[run.arm, run.seed] = bleu
        _write_generation_run(run.run_dir, float(bleu.mean()), {"bleu": bleu, "ser": ser})
    sweep.metric = "val/bleu"
    summarise(sweep, tmp_path)
    rows = _summary_rows(tmp_path)
    p = {}
    for arm in ("up", "noise"):
        a = np.concatenate([scores[arm, s] for s in sweep.seeds])
        b = np.concatenate([scores["ref", s] for s in sweep.seeds])
        res = permutation_test((a - b,), np.mean, permutation_type="samples", n_resamples=20_000, random_state=0)
        p[arm] = float(rows[arm]["p_example"])
        assert rows[arm]["pairs"] == "30"
        assert (int(rows[arm]["only_arm"]), int(rows[arm]["only_ref"])) == (int((a > b).sum()), int((a < b).sum()))
        assert p[arm] == pytest.approx(res.pvalue, abs=0.01)
    assert p["up"] < 0.001 < p["noise"]
    assert [float(rows[a]["p_example_holm"]) for a in ("up", "noise")] == pytest.approx(holm([p["up"], p["noise"]]))
    summary = (tmp_path / "summary.md").read_text()  # no right or wrong, so no McNemar in a generation summary
    assert "| arm / ref better | p (examples) | p (examples, Holm) |" in summary and "McNemar" not in summary
    sweep.example_score = "ser"
    summarise(sweep, tmp_path)
    up = _summary_rows(tmp_path)["up"]
    assert up["pairs"] == "10" and int(up["only_arm"]) > int(up["only_ref"])  # lower SER counts as better


def test_an_arm_that_trains_nothing_runs_once_and_stands_for_every_seed(tmp_path, monkeypatch, capsys):
    """model.method=none is deterministic: one run (the first seed), paired with every reference seed at the seed
    level (its value against each seed's) and at the example level (its scores against each run's)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "overrides: [model.task=generation, data.source=e2e_nlg]\nseeds: [0, 1, 2, 3]\nreference: ref\n"
        "metric: val/bleu\narms:\n  ref: []\n  other: [prefix.top_k=1]\n"
        "  fewshot: [model.method=none, data.few_shot=2, model.max_length=128]\n"
    )
    sweep = load_sweep(path)
    assert sweep.once == ["fewshot"]
    out = tmp_path / "out"
    started = []

    def fake_run(cmd, **kwargs):
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        started.append(run_dir)
        (run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/bleu": 1.0, "trainable_params": 1}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("moe_prefix.tools.ablate.subprocess.run", fake_run)
    run_sweep(sweep, out)
    assert len(started) == 4 + 4 + 1 and [d for d in started if "fewshot" in str(d)] == [out / "fewshot" / "seed0"]
    log = capsys.readouterr().out  # after each run but the last, the time left: runs to go, none after the last
    assert [f"{n} to go, about 0 min" in log for n in range(9)] == [False] + [True] * 8
    rng = np.random.default_rng(1)
    ref = {s: rng.uniform(10, 60, 15) for s in sweep.seeds}
    few = rng.uniform(5, 55, 15)
    for run in plan(sweep, tmp_path / "runs"):
        bleu = few if run.arm == "fewshot" else ref[run.seed] + (2.0 if run.arm == "other" else 0.0)
        _write_generation_run(run.run_dir, float(bleu.mean()), {"bleu": bleu})
    text = summarise(sweep, tmp_path / "runs").read_text()
    rows = _summary_rows(tmp_path / "runs")
    row = rows["fewshot"]
    assert row["n"] == "1" and row["ci_low"] == "nan" and "| fewshot | 1 |" in text and "One run each" in text
    a = np.full(4, few.mean())
    b = np.array([ref[s].mean() for s in sweep.seeds])
    exact = permutation_test((a - b,), np.mean, permutation_type="samples", n_resamples=10_000).pvalue
    assert float(row["diff"]) == pytest.approx((a - b).mean()) and float(row["p"]) == pytest.approx(exact)
    d = np.concatenate([few - ref[s] for s in sweep.seeds])
    res = permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20_000, random_state=0)
    assert row["pairs"] == "60" and float(row["p_example"]) == pytest.approx(res.pvalue, abs=0.01)
    assert (int(row["only_arm"]), int(row["only_ref"])) == (int((d > 0).sum()), int((d < 0).sum()))
    assert float(rows["other"]["p_example_holm"]) == pytest.approx(
        holm([float(rows["other"]["p_example"]), float(row["p_example"])])[0]
    )
    with open(tmp_path / "runs" / "runs.csv", newline="") as f:
        assert [r["arm"] for r in csv.DictReader(f)].count("fewshot") == 1


def test_an_arm_cannot_start_from_an_arm_that_trains_nothing(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "overrides: [model.task=generation, data.source=e2e_nlg]\narms:\n  bare: [model.method=none]\n"
        "  next: [model.init_from=@bare]\n"
    )
    with pytest.raises(ConfigError, match="@bare trains nothing and runs once"):
        load_sweep(path)


def test_time_left_spreads_the_median_run_over_the_workers():
    assert time_left([100.0, 300.0, 200.0], left=5, workers=2) == (
        "5 to go, about 8 min at the median run so far (200 s, 2 side by side)"
    )  # 5 x 200 / 2 = 500 s
    assert time_left([2_000.0], left=1, workers=2).startswith("1 to go, about 33 min")  # one run left: one worker
    assert time_left([2_000.0, 1_000.0], left=24, workers=2).startswith("24 to go, about 5.0 h")


def test_bad_arm_fails_before_any_run():
    with pytest.raises(ConfigError, match="arm 'prefix.top_k=9'"):
        sweep_from_grid(None, ["prefix.top_k=1,9"], [0], [])


def test_killed_sweep_restarts_without_redoing_finished_runs(tiny_backbone_dir, reviews_csv, tmp_path):
    budget = [o for o in tiny_run_overrides(tiny_backbone_dir, reviews_csv, "unused") if not o.startswith("run_dir")]
    budget = [o for o in budget if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=30"]
    args = [
        sys.executable,
        "scripts/ablate.py",
        "--sweep",
        "prefix.top_k=1,2",
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "sweep"),
        "--set",
        *budget,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    first = tmp_path / "sweep" / "prefix.top_k=1" / "seed0" / "metrics.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its current fit
    proc.wait()
    proc.stdout.close()
    stamp = first.stat().st_mtime_ns
    second = tmp_path / "sweep" / "prefix.top_k=2" / "seed0" / "metrics.json"
    assert not second.exists()
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 already done, 1 to go" in again.stdout
    assert first.stat().st_mtime_ns == stamp and second.exists()
    assert "| prefix.top_k=2 | 1 |" in (tmp_path / "sweep" / "summary.md").read_text()


@pytest.mark.parametrize("method", ["linear_probe", "prompt", "lora", "full"])
def test_baselines_train_through_the_same_fit(tiny_backbone_dir, reviews_csv, tmp_path, method):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tiny_backbone_dir, reviews_csv, tmp_path / method, **{"model.method": method, "trainer.max_steps": 4}
        ),
    )
    metrics = fit(cfg).metrics
    assert "val/acc" in metrics and metrics["trainable_params"] > 0
    if method == "linear_probe":
        assert metrics["trainable_params"] == 32 * 2 + 2


def test_runs_start_the_installed_package_with_the_callers_environment(tmp_path, monkeypatch):
    """No scripts/ of a checkout, no HF_HUB_OFFLINE forced on the children; checkpoints mean --resume."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sweep = sweep_from_grid(None, ["prefix.top_k=1,2"], [0], [])
    interrupted = plan(sweep, tmp_path)[1].run_dir
    (interrupted / rd.CHECKPOINT_DIR).mkdir(parents=True)
    (interrupted / rd.CHECKPOINT_DIR / "last.ckpt").touch()
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs.get("env")))
        run_dir = cmd[-1] if "--resume" in cmd else next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1]
        (Path(run_dir) / rd.METRICS_FILE).write_text(json.dumps({"val/acc": 0.5, "trainable_params": 1}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("moe_prefix.tools.ablate.subprocess.run", fake_run)
    run_sweep(sweep, tmp_path)
    (fresh, fresh_env), (resumed, resumed_env) = calls
    assert fresh[:4] == resumed[:4] == [sys.executable, "-m", "moe_prefix.tools", "fit"]
    assert resumed[4:] == ["--resume", str(interrupted)]
    assert not any("scripts/" in a for a in fresh + resumed)
    for env in (fresh_env, resumed_env):
        assert "HF_HUB_OFFLINE" not in (os.environ if env is None else env)


def test_a_run_stopped_by_a_full_disk_is_reported_in_the_summary_and_resumed_next_time(tmp_path, monkeypatch, capsys):
    """The run's one-line error (what `fit` prints on a full disk) reaches the sweep's summary; the next
    invocation continues that run with --resume and the summary no longer lists it."""
    sweep = sweep_from_grid(None, ["prefix.top_k=1,2"], [0], [])
    stopped = plan(sweep, tmp_path)[1].run_dir
    line = (
        f"error: run stopped: writing {stopped}/checkpoints/step=100.ckpt failed (No space left on device); the "
        f"last good checkpoint, {stopped}/checkpoints/last.ckpt (step 50), is intact; free some space, then "
        f"continue with: moe-prefix fit --resume {stopped}"
    )
    calls = []

    def fake_run(cmd, stdout=None, **kwargs):
        calls.append(cmd)
        resume = "--resume" in cmd
        run_dir = Path(cmd[-1] if resume else next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        stdout.write("some progress\n")
        if run_dir == stopped and not resume:
            (run_dir / rd.CHECKPOINT_DIR).mkdir(parents=True)
            (run_dir / rd.CHECKPOINT_DIR / "last.ckpt").touch()
            stdout.write(line + "\n")
            return subprocess.CompletedProcess(cmd, 2)
        (run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/acc": 0.5, "trainable_params": 1}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("moe_prefix.tools.ablate.subprocess.run", fake_run)
    summary = run_sweep(sweep, tmp_path).read_text()
    assert f"| prefix.top_k=2 | 0 | {line} |" in summary, summary
    assert f"prefix.top_k=2/seed0: {line}" in capsys.readouterr().err
    assert "next invocation" in summary

    calls.clear()
    summary = run_sweep(sweep, tmp_path).read_text()
    assert calls == [[sys.executable, "-m", "moe_prefix.tools", "fit", "--resume", str(stopped)]]
    assert "failed" not in summary and "| prefix.top_k=2 | 1 |" in summary


def _sweep_file(folder: Path, base: str) -> Path:
    (folder / "configs" / "ablations").mkdir(parents=True)
    (folder / "configs" / "base.yaml").write_text("seed: 7\n")
    path = folder / "configs" / "ablations" / "sweep.yaml"
    path.write_text(f"base: {base}\narms:\n  one: [prefix.top_k=1]\n")
    return path


def test_sweep_file_base_is_found_from_the_root_and_from_elsewhere(tmp_path, monkeypatch):
    sweep_file = _sweep_file(tmp_path / "repo", "configs/base.yaml")
    expected = (tmp_path / "repo" / "configs" / "base.yaml").resolve()
    monkeypatch.chdir(tmp_path / "repo")
    assert load_sweep("configs/ablations/sweep.yaml").base == expected
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_sweep(sweep_file).base == expected
    # --base on the command line is relative to the current directory only
    with pytest.raises(ConfigError, match="base config not found: configs/base.yaml"):
        sweep_from_grid("configs/base.yaml", ["prefix.top_k=1,2"], [0], [])


def test_missing_sweep_base_is_named(tmp_path, monkeypatch):
    sweep_file = _sweep_file(tmp_path, "configs/nope.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="base config not found: configs/nope.yaml"):
        load_sweep(sweep_file)


def test_curve_plots_the_metric_against_a_config_value_per_series(tmp_path):
    arms = {
        f"n{n}_{r}": [f"data.max_train_examples={n}", f"prefix.reparam={r}"]
        for n in (100, 400)
        for r in ("true", "false")
    }
    sweep = Sweep(None, arms, seeds=[0, 1], curve={"x": "data.max_train_examples", "series": "prefix.reparam"})
    for run in plan(sweep, tmp_path):
        n = int(run.arm.split("_")[0][1:])
        acc = 0.6 + 0.1 * (n == 400) + 0.05 * run.arm.endswith("true") + 0.01 * run.seed
        run.run_dir.mkdir(parents=True)
        (run.run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/acc": acc, "trainable_params": 1}))
    summarise(sweep, tmp_path)
    with open(tmp_path / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["series"], int(r["x"])): float(r["mean"]) for r in rows}
    assert got == pytest.approx(
        {("False", 100): 0.605, ("False", 400): 0.705, ("True", 100): 0.655, ("True", 400): 0.755}
    )
    assert (tmp_path / "curve.png").is_file()


def test_curve_contrasts_test_each_series_against_the_first_at_every_x(tmp_path):
    """At each training size, reparam=True against reparam=False on matched seeds: the difference, the exact
    sign-flip p (scipy's permutation test as the reference) and Holm across the sizes."""
    arms = {
        f"n{n}_{r}": [f"data.max_train_examples={n}", f"prefix.reparam={r}"]
        for n in (100, 400)
        for r in ("true", "false")
    }
    seeds = [0, 1, 2, 3, 4]
    sweep = Sweep(None, arms, seeds=seeds, curve={"x": "data.max_train_examples", "series": "prefix.reparam"})
    gain = {100: [0.05, 0.04, 0.06, 0.05, 0.03], 400: [0.01, -0.02, 0.0, 0.02, -0.01]}  # per seed
    for run in plan(sweep, tmp_path):
        n = int(run.arm.split("_")[0][1:])
        acc = 0.6 + 0.01 * run.seed + (gain[n][run.seed] if run.arm.endswith("true") else 0.0)
        run.run_dir.mkdir(parents=True)
        (run.run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/acc": acc, "trainable_params": 1}))
    summarise(sweep, tmp_path)
    with open(tmp_path / "curve_contrasts.csv", newline="") as f:
        rows = {int(r["x"]): r for r in csv.DictReader(f)}
    assert set(rows) == {100, 400} and {r["series"] for r in rows.values()} == {"True"}
    assert {r["versus"] for r in rows.values()} == {"False"}
    reference = {
        n: permutation_test(
            (np.array(g),), np.mean, permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
        ).pvalue
        for n, g in gain.items()
    }
    for n, g in gain.items():
        assert float(rows[n]["diff"]) == pytest.approx(np.mean(g))
        assert float(rows[n]["p"]) == pytest.approx(reference[n])
        # Δ's interval: the percentile bootstrap of the per-seed differences (scipy's, another resampling stream)
        expected = bootstrap((np.array(g),), np.mean, method="percentile", n_resamples=10_000, random_state=1)
        got = (float(rows[n]["diff_ci_low"]), float(rows[n]["diff_ci_high"]))
        assert got == pytest.approx(tuple(expected.confidence_interval), abs=3e-3)
    assert [float(rows[n]["p_holm"]) for n in (100, 400)] == pytest.approx(holm([reference[100], reference[400]]))
    assert float(rows[100]["p"]) == pytest.approx(2 / 32)  # every seed gains: the smallest p 5 seeds allow
    assert "| 100 | True vs False | 5 |" in (tmp_path / "curve_contrasts.md").read_text()


def test_sweep_file_curve_is_checked(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("arms:\n  a: []\ncurve: {y: data.max_train_examples}\n")
    with pytest.raises(ConfigError, match="curve must be"):
        load_sweep(path)


def test_arm_reference_becomes_the_same_seeds_run_and_waits_for_it(tmp_path, monkeypatch):
    """`model.init_from=@sft` starts each seed's run from that seed's sft run, after it has finished, even with
    two workers; a failed sft run skips its dependant."""
    sweep = Sweep(None, {"sft": [], "rl": ["model.init_from=@sft"]}, seeds=[0, 1])
    runs = {(r.arm, r.seed): r for r in plan(sweep, tmp_path)}
    assert runs["rl", 1].after == "sft"
    assert f"model.init_from={runs['sft', 1].run_dir}" in runs["rl", 1].overrides
    events = []

    def fake_run(cmd, **kwargs):
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        events.append(("start", run_dir))
        init = next((a.split("=", 1)[1] for a in cmd if a.startswith("model.init_from=")), None)
        if init is not None:
            assert (Path(init) / rd.METRICS_FILE).is_file(), "started before the run it starts from had finished"
        time.sleep(0.2)
        if run_dir == runs["sft", 1].run_dir:
            return subprocess.CompletedProcess(cmd, 1)
        (run_dir / rd.METRICS_FILE).write_text(json.dumps({"val/acc": 0.5, "trainable_params": 1}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("moe_prefix.tools.ablate.subprocess.run", fake_run)
    run_sweep(sweep, tmp_path, workers=2)
    started = [d for _, d in events]
    assert runs["rl", 0].run_dir in started and runs["rl", 1].run_dir not in started
    assert not runs["rl", 1].done


def test_arm_reference_must_name_an_earlier_arm(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("arms:\n  rl: [model.init_from=@later]\n  later: []\n")
    with pytest.raises(ConfigError, match="@later must name an arm listed before it"):
        load_sweep(path)


def test_further_metrics_get_a_table_each(tmp_path):
    arms = {"ref": [], "other": ["prefix.top_k=1"], "no_bleu": ["prefix.top_k=2"]}
    sweep = Sweep(None, arms, seeds=[0, 1], reference="ref", metric="val/ser")
    sweep.also = ["val/bleu"]
    for run in plan(sweep, tmp_path):
        run.run_dir.mkdir(parents=True)
        worse = run.arm == "other"
        metrics = {"val/ser": 10.0 + 5 * worse + run.seed, "val/bleu": 40.0 - 2 * worse, "trainable_params": 1}
        if run.arm == "no_bleu":  # a run that does not report the metric is left out of its table
            del metrics["val/bleu"]
        (run.run_dir / rd.METRICS_FILE).write_text(json.dumps(metrics))
    text = summarise(sweep, tmp_path).read_text()
    assert "### val/ser" in text and "### val/bleu" in text
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = {(r["metric"], r["arm"]): r for r in csv.DictReader(f)}
    assert float(rows["val/ser", "other"]["diff"]) == pytest.approx(5.0)
    assert float(rows["val/bleu", "other"]["diff"]) == pytest.approx(-2.0)
    assert float(rows["val/bleu", "ref"]["mean"]) == pytest.approx(40.0)
    assert ("val/ser", "no_bleu") in rows and ("val/bleu", "no_bleu") not in rows
    with open(tmp_path / "runs.csv", newline="") as f:
        assert [r["val/bleu"] for r in csv.DictReader(f)] == ["40.0", "38.0", "nan"] * 2


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_file_loads(sweep_file):
    """load_sweep builds every arm's config, so a sweep that a change of its base config broke (router_input.yaml
    once asked for oracle routing under the k-means initialisation configs/moe4.yaml adopted) fails here."""
    assert load_sweep(sweep_file).arms


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


COMMITTED_STUDIES = sorted(
    p for p in (ROOT / "docs" / "studies").iterdir() if (ROOT / "configs" / "ablations" / f"{p.name}.yaml").is_file()
)


@pytest.mark.parametrize("study", COMMITTED_STUDIES, ids=lambda p: p.name)
def test_committed_studies_still_resolve_to_the_configs_they_ran(study):
    """Library defaults move (issue 24 made the router recipe the default); a sweep file pins what its committed
    runs had, so running it again reproduces them. Paths and the run's own name may differ; seeds are checked."""
    sweep = load_sweep(ROOT / "configs" / "ablations" / f"{study.name}.yaml")
    own = ("run_dir", "name", "model.init_from", "seed", "tracking.tags.seed")
    resolved: dict[str, dict] = {}  # one config per arm: the seeds' configs differ only in what `own` names
    checked = 0
    for run in plan(sweep, study):
        saved = run.run_dir / "config.yaml"
        if not saved.is_file():
            continue
        if run.arm not in resolved:
            resolved[run.arm] = _flat(to_dict(load_config(sweep.base, run.overrides)))
        ran, now = _flat(OmegaConf.to_container(OmegaConf.load(saved))), resolved[run.arm]
        differ = {
            k: (ran[k], now[k])
            for k in ran
            if k in now
            and k not in own
            and ran[k] != now[k]
            and not (isinstance(now[k], tuple) and list(now[k]) == ran[k])
        }
        assert not differ and ran["seed"] == run.seed, f"{run.arm} seed {run.seed}: {differ}"
        checked += 1
    assert checked


def test_compare_puts_the_tested_arms_of_several_sweeps_in_one_table(tmp_path, capsys):
    """`moe-prefix compare`: each study's tested arms with the summary's own Δ, interval and Holm p (times 100),
    and the most dead experts any seed of the arm ended with; the reference and untested arms have no row."""
    from moe_prefix.tools.cli import main as cli_main

    dead = {("mix", 2): 1.0}
    for study, gain in (("one", 0.02), ("two", -0.01)):
        sweep = Sweep(None, {"ref": [], "mix": [], "src": []}, seeds=[0, 1, 2, 3], reference="ref")
        sweep.also, sweep.untested = ["val/dead_experts"], ["src"]
        for run in plan(sweep, tmp_path / study):
            acc = 0.8 + 0.01 * run.seed + (gain + 0.002 * run.seed if run.arm == "mix" else 0.0)
            metrics = {"val/acc": acc, "trainable_params": 1, "val/dead_experts": dead.get((run.arm, run.seed), 0.0)}
            run.run_dir.mkdir(parents=True)
            (run.run_dir / rd.METRICS_FILE).write_text(json.dumps(metrics))
        summarise(sweep, tmp_path / study)
    assert cli_main(["compare", str(tmp_path / "one"), str(tmp_path / "two")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [("one", "mix"), ("two", "mix")]
    for row, study in zip(rows, ("one", "two"), strict=True):
        with open(tmp_path / study / "summary.csv", newline="") as f:
            mix = next(r for r in csv.DictReader(f) if r["arm"] == "mix" and r["metric"] == "val/acc")
        low, high = (100 * float(mix[k]) for k in ("diff_ci_low", "diff_ci_high"))
        assert row[4] == f"{100 * float(mix['diff']):+.2f} [{low:+.2f}, {high:+.2f}] vs ref"
        assert row[5] == f"{float(mix['p_holm']):.3f}"
    assert rows[0][4].startswith("+2.30") and rows[1][4].startswith("-0.70")
    assert rows[0][-1].strip("| ") == "1" and rows[1][-1].strip("| ") == "1"

    assert cli_main(["compare", str(tmp_path)]) == 2
    assert "has no summary.csv" in capsys.readouterr().err


def test_publish_copies_finished_runs_without_weights_and_summarises_the_copy(tmp_path, monkeypatch, capsys):
    """`ablate --publish DEST`: every finished run's config, metrics, per-example table and samples (no weights,
    checkpoints or logs; an unfinished run not at all), configs pointing at runs/<sweep name>/ instead of the
    machine's folder, and a summary computed from the copy that equals the sweep folder's own."""
    from moe_prefix.tools.cli import main as cli_main

    out = tmp_path / "machine" / "gem_sweep"  # absolute, as a sweep launched with --out /abs/path writes it
    sweep = Sweep(None, {"sft": [], "rl": ["model.init_from=@sft"]}, seeds=[0, 1], reference="sft")
    rng = np.random.default_rng(0)
    for run in plan(sweep, out):
        if (run.arm, run.seed) == ("rl", 1):  # in flight: checkpoints, no metrics
            (run.run_dir / rd.CHECKPOINT_DIR).mkdir(parents=True)
            (run.run_dir / rd.CHECKPOINT_DIR / "last.ckpt").write_bytes(b"x")
            continue
        bleu = rng.uniform(10, 60, 6)
        _write_generation_run(run.run_dir, float(bleu.mean()), {"bleu": bleu})
        save_config(load_config(None, run.overrides), run.run_dir / rd.CONFIG_FILE)
        (run.run_dir / rd.SAMPLES_FILE).write_text('{"id": "e0", "prediction": "a"}\n')
        (run.run_dir / rd.WEIGHTS_FILE).write_bytes(b"weights")
        (run.run_dir / rd.LOG_DIR).mkdir()
    sweep.metric = "val/bleu"
    summarise(sweep, out)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "metric: val/bleu\nreference: sft\nseeds: [0, 1]\narms:\n  sft: []\n  rl: [model.init_from=@sft]\n"
    )

    dest = tmp_path / "docs" / "studies" / "gem_sweep"
    assert cli_main(["ablate", str(sweep_file), "--out", str(out), "--publish", str(dest)]) == 0
    assert "3 finished run(s)" in capsys.readouterr().out
    published = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and p.parent != dest)
    assert published == sorted(
        f"{arm}/seed{seed}/{name}"
        for arm, seed in (("sft", 0), ("sft", 1), ("rl", 0))
        for name in (rd.CONFIG_FILE, rd.METRICS_FILE, rd.ROUTING_FILE, rd.SAMPLES_FILE)
    )
    rl = OmegaConf.load(dest / "rl" / "seed0" / rd.CONFIG_FILE)
    assert (rl.run_dir, rl.model.init_from) == ("runs/gem_sweep/rl/seed0", "runs/gem_sweep/sft/seed0")
    assert str(tmp_path) not in "".join(p.read_text() for p in dest.rglob("*") if p.is_file() and p.suffix != ".png")
    assert (dest / "summary.csv").read_text() == (out / "summary.csv").read_text()
    assert (dest / "runs.csv").read_text() == (out / "runs.csv").read_text()

    # Published twice over a folder restored from the first publication: nothing lost, nothing run.
    monkeypatch.setattr("moe_prefix.tools.ablate.subprocess.run", lambda *a, **k: pytest.fail("publish ran a fit"))
    assert cli_main(["ablate", str(sweep_file), "--out", str(dest), "--publish", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "summary.csv").read_text() == (out / "summary.csv").read_text()
    assert cli_main(["ablate", str(sweep_file), "--out", str(tmp_path / "nowhere"), "--publish", str(dest)]) == 2
    assert "no sweep folder" in capsys.readouterr().err
    assert cli_main(["ablate", str(sweep_file), "--out", str(out), "--publish", str(out)]) == 2
    assert "is the sweep folder itself" in capsys.readouterr().err
