"""The training step on a GPU-friendly footing: logs only on log steps, the finite check off the hot path, bf16."""

import csv
import math

import pytest
from conftest import poison_loss_from_step, tiny_run_overrides

from moe_prefix.train import module
from moe_prefix.train.engine import fit
from moe_prefix.train.module import NonFiniteLossError
from moe_prefix.train.run_config import load_config

pytestmark = pytest.mark.slow  # every test here is a whole (tiny) fit


def _fit(backbone, csv_path, run_dir, **overrides):
    return fit(load_config(None, tiny_run_overrides(backbone, csv_path, run_dir, **overrides)))


def test_routing_statistics_are_logged_on_every_log_step(tiny_backbone_dir, reviews_csv, tmp_path):
    result = _fit(tiny_backbone_dir, reviews_csv, tmp_path / "run", **{"trainer.log_every_n_steps": 3})
    with open(result.run_dir / "logs/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [2, 5]  # 8 steps, logged where (step + 1) % 3 == 0
    for row in rows:
        for key in ("train/aux_loss", "train/router_entropy", "train/prefix_len", "train/load/e0"):
            assert math.isfinite(float(row[key])), key


def test_fit_in_bf16_mixed_on_the_cpu(tiny_backbone_dir, reviews_csv, tmp_path):
    result = _fit(tiny_backbone_dir, reviews_csv, tmp_path / "run", **{"trainer.precision": "bf16-mixed"})
    assert result.metrics["steps"] == 8
    assert math.isfinite(result.metrics["val/loss"]) and 0 <= result.metrics["val/acc"] <= 1


def test_deferred_finite_check_keeps_the_last_good_checkpoint(tiny_backbone_dir, reviews_csv, tmp_path, monkeypatch):
    """What a GPU run does: no host read per step; the bad step is found before the next checkpoint is written."""

    monkeypatch.setattr(module, "_host_reads_are_free", lambda device: False)
    poison_loss_from_step(monkeypatch, 6)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6"):
        _fit(tiny_backbone_dir, reviews_csv, run, **{"trainer.max_steps": 20})
    # checkpoints every 4 steps: step 8's is refused, so step 4's state is the last one kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step=4.ckpt"]
