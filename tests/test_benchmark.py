"""The benchmark's core on tiny configs (seconds): every arm runs, the JSON carries every ratio."""

import inspect
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_prefix.injection import SEQ2SEQ_MIN_TRANSFORMERS, seq2seq_supported
from moe_prefix.tools.bench_presets import PRESETS, PresetGroup, run_preset
from moe_prefix.tools.bench_timing import Arm, paired_ratio, peak_memory_mb, time_interleaved
from moe_prefix.tools.benchmark import TARGETS, BenchConfig, format_report, run

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


def _bert_takes_past_key_values() -> bool:
    """What PEFT checks before prefix tuning a sequence classifier: its forward, or its backbone's, takes the cache."""
    from transformers import BertForSequenceClassification, BertModel

    forwards = (BertForSequenceClassification.forward, BertModel.forward)
    return any("past_key_values" in inspect.signature(f).parameters for f in forwards)


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
    # PEFT's sequence-classification route needs a BERT forward that takes past_key_values, which transformers
    # dropped between 5.8 and 5.24: where the route fails, the error is reported, not raised.
    seq_cls_error = results["notes"]["encoder"]["peft_seq_cls_error"]
    if _bert_takes_past_key_values():
        assert seq_cls_error is None
    else:
        assert "past key values" in seq_cls_error
    assert results["notes"]["encoder"]["eval_lengths"]["max_kept"] < tiny_config().eval_max_len
    assert list(results["scaling"]["experts"]) == ["1", "4", "16", "64"]
    assert list(results["scaling"]["prefix_len"]) == ["2", "4", "8"]
    assert 0 < dec["moe4_top2_blend"]["trainable"] < dec["full_ft"]["trainable"]
    assert results["notes"]["encoder"]["checkpoint"]["checkpoint_bytes"] > 0
    # both attention paths side by side, where the split applies (the encoder's arms without attention dropout)
    assert {"moe1_split", "moe1_joint", "moe4_top2_blend_split", "moe4_top2_blend_joint"} <= set(dec)
    assert {"moe4_top2_blend_nodrop_split", "moe4_top2_blend_nodrop_joint"} <= set(enc)
    for key in ("decoder_moe1_split_vs_joint", "decoder_moe4_top2_split_vs_joint"):
        assert results["ratios"][key] > 0, key
    assert results["ratios"]["encoder_moe4_top2_nodrop_split_vs_joint"] > 0


TINY_PRESET = (
    PresetGroup("tiny_llama", "tiny-llama", True, 2, 12),
    PresetGroup("tiny_bert", "tiny-bert", False, 4, 12),
)


def _tiny_preset(device: str) -> dict:
    cfg = BenchConfig(device=device, dtype="bfloat16", reps=2, warmup=1, memory=False, prefix_len=4)
    return json.loads(json.dumps(run_preset("gpu", cfg, log=lambda msg: None, groups=TINY_PRESET)))


def test_gpu_preset_holds_the_issue_arms():
    assert [(g.model, g.batch, g.seq_len) for g in PRESETS["gpu"]] == [
        ("llama-1.1b", 16, 256),
        ("minilm-config", 128, 256),
        ("minilm-config", 32, 64),
    ]


def test_gpu_preset_code_runs_on_tiny_groups_in_bf16():
    """The preset's arms and ratios, on tiny models on the CPU (the device is the only difference)."""
    results = _tiny_preset("cpu")
    llama, bert = results["groups"]["tiny_llama"], results["groups"]["tiny_bert"]
    expected = {"frozen_forward", "backward_floor", "peft_prefix", "moe1", "moe1_joint", "moe4_top2_blend_joint"}
    assert expected <= set(llama) and expected | {"backward_floor_nodrop", "moe4_top2_blend_nodrop_joint"} <= set(bert)
    assert llama["moe1_joint"]["path"] == "joint" and llama["moe1"]["path"] == "auto"
    for key in ("moe1_vs_peft", "moe4_top2_vs_peft", "moe4_top2_vs_floor", "moe4_top2_vs_joint"):
        assert results["ratios"][f"tiny_llama/{key}"] > 0 and results["ratios"][f"tiny_bert/{key}"] > 0
    assert results["ratios"]["tiny_bert/moe4_top2_nodrop_vs_joint"] > 0
    assert "tiny_llama/moe1_vs_peft" in format_report(results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_runs_on_cuda():
    """Both the quick run (its learned-length head once drew from a CPU generator into CUDA) and the preset."""
    results = run(replace(tiny_config(), device="cuda"), log=lambda msg: None)
    assert results["ratios"]["moe1_vs_peft"] > 0
    results = _tiny_preset("cuda")
    assert results["ratios"]["tiny_llama/moe4_top2_vs_peft"] > 0


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


@pytest.mark.skipif(
    not seq2seq_supported(), reason=f"encoder-decoder prefixes need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS}"
)
def test_seq2seq_preset_runs_peft_and_every_site_arm_on_a_tiny_bart():
    """The seq2seq preset's arms and ratios on a tiny BART (BART-base's geometry is the only difference)."""
    assert [(g.model, g.seq2seq) for g in PRESETS["seq2seq"]] == [("bart-base-config", True)]
    cfg = BenchConfig(reps=2, warmup=1, memory=False, prefix_len=4)
    groups = (PresetGroup("tiny_bart", "tiny-bart", False, 2, 12, seq2seq=True),)
    results = json.loads(json.dumps(run_preset("seq2seq", cfg, log=lambda msg: None, groups=groups)))
    arms = results["groups"]["tiny_bart"]
    assert set(arms) == {"frozen_forward", "peft_prefix", "moe1_decoder", "moe1", "moe4_top2_blend"}
    assert arms["moe1_decoder"]["sites"] == ["decoder"] and arms["moe1"]["sites"] == ["encoder", "decoder", "cross"]
    # one prefix row per site and layer: two more sites hold 2 x (2 layers x k,v x 4 heads x P=4 x 8 dims)
    assert arms["moe1"]["trainable"] - arms["moe1_decoder"]["trainable"] == 2 * (2 * 2 * 4 * 4 * 8)
    for key in ("moe1_vs_peft", "moe1_decoder_vs_peft", "moe4_top2_vs_peft", "moe4_top2_vs_forward"):
        assert results["ratios"][f"tiny_bart/{key}"] > 0
