"""The benchmark's core on tiny configs (seconds): every arm runs, the JSON carries every ratio."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from moe_prefix.tools.benchmark import TARGETS, Arm, BenchConfig, paired_ratio, peak_memory_mb, run, time_interleaved

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
RATIOS = ("moe1_vs_peft", "moe4_top2_vs_peft", "e64_vs_e4", "step_vs_forward", "checkpoint_fraction")


def tiny_config() -> BenchConfig:
    return BenchConfig(
        encoder="tiny-bert",
        decoder="tiny-llama",
        enc_batch=4,
        dec_batch=2,
        seq_len=12,
        prefix_len=4,
        prefix_lens=(2, 8),
        eval_max_len=16,
        eval_mean_len=3.0,
        gen_batch=2,
        gen_prompt=5,
        gen_tokens=3,
    ).quick()


def test_time_interleaved_rotates_the_first_arm():
    calls = []
    arms = [Arm(name, lambda name=name: calls.append(name), tokens=1) for name in "abc"]
    times = time_interleaved(arms, reps=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")
    assert set(times) == {"wall", "cpu"}
    assert all(len(v) == 3 for clock in times.values() for v in clock.values())


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    times = {"a": [2.0, 3.0, 10.0], "b": [1.0, 1.0, 10.0]}
    assert paired_ratio(times, "a", "b") == 2.0
    assert paired_ratio(times, "a", "missing") is None


def test_peak_memory_sees_a_temporary_allocation():
    import torch

    assert peak_memory_mb(lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)) >= 3.9


def test_quick_run_on_tiny_configs_has_every_arm_and_ratio():
    results = run(tiny_config(), log=lambda msg: None)
    results = json.loads(json.dumps(results))  # what --json writes
    for key in RATIOS:
        assert results["ratios"][key] is not None and results["ratios"][key] > 0, key
        assert key in results["met"] and results["ratios_cpu_clock"][key] is not None
    assert set(TARGETS) == set(RATIOS)
    enc, dec = results["groups"]["encoder"], results["groups"]["decoder"]
    for name in ("frozen_forward", "backward_floor", "moe1", "moe4_top2_concat", "moe4_top2_learned", "full_ft"):
        assert name in enc and name in dec
        assert enc[name]["ms"] > 0 and enc[name]["peak_mb"] >= 0
    assert {"peft_prefix", "E64", "eval_static", "eval_dynamic"} <= set(enc)
    assert {"peft_prefix", "generate_plain", "generate_prefix"} <= set(dec)
    # PEFT's sequence-classification route fails on BERT; the error is reported, not raised.
    assert "past key values" in results["notes"]["encoder"]["peft_seq_cls_error"]
    assert results["notes"]["encoder"]["eval_lengths"]["max_kept"] < tiny_config().eval_max_len
    assert list(results["scaling"]["experts"]) == ["1", "4", "16", "64"]
    assert list(results["scaling"]["prefix_len"]) == ["2", "4", "8"]
    assert 0 < dec["moe4_top2_blend"]["trainable"] < dec["full_ft"]["trainable"]
    assert results["notes"]["encoder"]["checkpoint"]["checkpoint_bytes"] > 0


@pytest.mark.slow
def test_script_writes_json(tmp_path, monkeypatch, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["bench.py", "--quick", "--encoder", "tiny-bert", "--decoder", "tiny-llama", "--no-memory"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out), "--markdown", str(md)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    written = json.loads(out.read_text())
    assert set(RATIOS) <= set(written["ratios"])
    assert written["command"].startswith("python scripts/bench.py --quick")
    assert "ratios (median of per-repetition paired ratios" in capsys.readouterr().out
    assert "| moe1_vs_peft |" in md.read_text()
