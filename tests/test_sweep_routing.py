"""`moe-prefix routing`: a sweep's routing per run, recounted from routing.csv as training counted it."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from moe_prefix.tools.sweep_routing import routing_markdown, sweep_routing
from moe_prefix.train import run_dir as rd
from moe_prefix.train.module import routing_metrics
from moe_prefix.train.run_config import ConfigError

GROUPS = ["b_src", "a_src"]


def _rows(seed: int, n: int = 40, experts: int = 4) -> list[dict]:
    """Validation rows as the modules keep them: top-2 weights; group 0 mostly on expert 1, group 1 on 2."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        group = i % 2
        first = 1 + group if rng.random() < 0.9 else 3
        second = int(rng.choice([e for e in range(1, experts) if e != first]))  # expert 0: never chosen
        w = np.zeros(experts)
        w[first] = rng.uniform(0.6, 0.99)
        w[second] = 1 - w[first]
        rows.append(
            {
                "index": i,
                "id": f"x{i}",
                "group": group,
                "loss": 0.5,
                "input_len": 7,
                "prefix_len": 16.0,
                "experts": [first, second],
                "weights": w.tolist(),
            }
        )
    return rows


def _write_run(run_dir, rows, experts=4, routed=True):
    """routing.csv through the writer fit uses, metrics.json with the runner's own routing figures."""
    run_dir.mkdir(parents=True)
    if not routed:
        rows = [{k: v for k, v in r.items() if k not in ("weights", "experts", "prefix_len")} for r in rows]

    def cells(row):
        return [row["id"], GROUPS[row["group"]], row["input_len"], f"{row['loss']:.6f}"]

    rd.write_per_example_table(run_dir / rd.ROUTING_FILE, rows, experts, ["id", "group", "input_len", "loss"], cells)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a collapse warning is beside the point here
        metrics = {k: float(v) for k, v in routing_metrics(rows, experts).items()} if routed else {}
    (run_dir / rd.METRICS_FILE).write_text(json.dumps({**metrics, "val/acc": 0.9}))
    return metrics


def test_routing_table_recounts_what_training_logged(tmp_path):
    logged = {seed: _write_run(tmp_path / "moe" / f"seed{seed}", _rows(seed)) for seed in (0, 1, 10)}
    _write_run(tmp_path / "single" / "seed0", _rows(0), routed=False)  # no routing: left out
    (tmp_path / "moe" / "seed2").mkdir()  # started, not finished: left out
    rows, groups = sweep_routing(tmp_path, metric="val/acc")
    assert [(r["arm"], r["seed"]) for r in rows] == [("moe", 0), ("moe", 1), ("moe", 10)]  # seeds in number order
    assert groups == ["a_src", "b_src"]
    for r in rows:
        m = logged[r["seed"]]
        assert r["dead"] == m["val/dead_experts"] == 1  # expert 0 is never anyone's first choice
        assert r["entropy"] == pytest.approx(m["val/router_entropy"], abs=1e-5)  # routing.csv keeps 6 decimals
        assert r["NMI"] == pytest.approx(m["val/nmi"], abs=1e-9)
        assert r["top-1 by group"] == {"b_src": 1, "a_src": 2}
        assert r["experts chosen first"] == 3 and 0.6 < r["first-choice weight"] < 0.99
        assert r["val/acc"] == pytest.approx(0.9)
    text = routing_markdown(rows, groups)
    assert "| moe | 10 |" in text and "| e2 e1 | 0.9000 |" in text and "in the order a_src, b_src." in text


def test_routing_table_defaults_to_the_main_metric_and_names_bad_arms(tmp_path):
    _write_run(tmp_path / "moe" / "seed0", _rows(0))
    (tmp_path / "summary.csv").write_text("arm,n,mean,metric\nmoe,1,0.9,val/acc\n")
    rows, _ = sweep_routing(tmp_path)
    assert rows[0]["val/acc"] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="has no arm nope; its arms: moe"):
        sweep_routing(tmp_path, arms=["nope"])
    with pytest.raises(ConfigError, match="no finished run with routing weights"):
        sweep_routing(tmp_path / "moe")


def test_routing_command_prints_the_table(tmp_path):
    _write_run(tmp_path / "moe" / "seed0", _rows(0))
    cmd = [sys.executable, "-m", "moe_prefix.tools", "routing", str(tmp_path), "--metric", "val/acc"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| arm | seed | first-choice weight |") and "| moe | 0 |" in out.stdout
    bad = subprocess.run([*cmd[:-2], "--arms", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "its arms: moe" in bad.stderr
