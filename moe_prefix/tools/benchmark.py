"""Speed and memory of prefix methods on a real encoder and a grouped-query decoder.

The numbers behind docs/benchmarks.md; `scripts/bench.py` is the command line. This module holds the default
run (an encoder and a decoder group, scaling, evaluation with dynamic lengths, generation) and the reports;
how arms are timed is in `bench_timing`, what they run in `bench_models`, the presets in `bench_presets`.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from moe_prefix.config import PrefixConfig
from moe_prefix.mixture import PrefixMixture, attach
from moe_prefix.tools.bench_models import (
    Group,
    count_params,
    frozen_forward_arm,
    load_decoder,
    load_encoder,
    make_batch,
    peft_prefix_arm,
    pooled_loss,
    to_bench,
    train_step,
    trainable_params,
    try_peft,
)
from moe_prefix.tools.bench_timing import (
    CLOCKS,
    Arm,
    machine,
    paired_ratio,
    peak_memory_mb,
    summarise,
    time_interleaved,
)

TARGETS = {  # ratio -> the largest value that meets the target (checkpoint_fraction: strictly below)
    "moe1_vs_peft": 1.05,
    "moe4_top2_vs_peft": 1.10,
    "e64_vs_e4": 1.10,
    "step_vs_forward": 2.3,
    "checkpoint_fraction": 0.02,
}


@dataclass
class BenchConfig:
    """What to measure. Defaults are the documented full run (MiniLM 32 x 64, a wide tiny Llama)."""

    encoder: str = "minilm"  # asset alias or local folder (AutoModel), or "tiny-bert" (config, for tests)
    decoder: str = "wide-llama"  # wide-llama: LlamaConfig 512 wide, 8 layers, 8 heads / 2 KV heads;
    # smollm2-135m: the real model via assets; tiny-llama: 32 wide (tests)
    enc_batch: int = 32
    dec_batch: int = 8
    seq_len: int = 64
    prefix_len: int = 16  # P of every training arm, PEFT included
    experts: tuple[int, ...] = (1, 4, 16, 64)  # scaling in E at top-2 (E=1 can only use top-1)
    prefix_lens: tuple[int, ...] = (8, 32, 128)  # scaling in P at E=4, top-2 blend
    eval_max_len: int = 64  # the static maximum P in the dynamic-length evaluation
    eval_mean_len: float = 8.0  # mean learned length the length head is set to (before rounding)
    gen_batch: int = 4
    gen_prompt: int = 16
    gen_tokens: int = 32  # new tokens per generate() call (forced with min_new_tokens)
    reps: int = 7
    warmup: int = 1
    memory: bool = True  # one extra profiled call per arm for peak memory
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # float32 or bfloat16
    clock: str = "wall"  # the clock of "ratios": wall, or cpu (process CPU time; see time_interleaved)

    def quick(self) -> BenchConfig:
        """A smoke test: the same arms, two repetitions."""
        return replace(self, reps=2, warmup=1)


def prefix_configs(cfg: BenchConfig) -> dict[str, PrefixConfig]:
    """The moe_prefix training arms of both groups, by name."""
    P = cfg.prefix_len
    arms = {
        "moe1": PrefixConfig(num_experts=1, prefix_len=P, top_k=1),
        "moe4_top1_blend": PrefixConfig(num_experts=4, prefix_len=P, top_k=1),
        "moe4_top2_blend": PrefixConfig(num_experts=4, prefix_len=P, top_k=2),
        "moe4_top1_concat": PrefixConfig(num_experts=4, prefix_len=P, top_k=1, combine="concat"),
        "moe4_top2_concat": PrefixConfig(num_experts=4, prefix_len=P, top_k=2, combine="concat"),
        "moe4_top2_learned": PrefixConfig(num_experts=4, prefix_len=P, top_k=2, length="learned"),
    }
    return arms


def scaling_configs(cfg: BenchConfig) -> dict[str, PrefixConfig]:
    """Extra arms for the scaling tables (E at top-2, P at E=4); E=4 / P=prefix_len is moe4_top2_blend."""
    out = {}
    for e in cfg.experts:
        if e not in (1, 4):
            out[f"E{e}"] = PrefixConfig(num_experts=e, prefix_len=cfg.prefix_len, top_k=min(2, e))
    for p in cfg.prefix_lens:
        if p != cfg.prefix_len:
            out[f"P{p}"] = PrefixConfig(num_experts=4, prefix_len=p, top_k=2)
    return out


def _scaling_table(cfg: BenchConfig, arms: dict) -> dict:
    def name_e(e):
        return {1: "moe1", 4: "moe4_top2_blend"}.get(e, f"E{e}")

    def name_p(p):
        return "moe4_top2_blend" if p == cfg.prefix_len else f"P{p}"

    return {
        "experts": {str(e): arms[name_e(e)]["ms"] for e in cfg.experts if name_e(e) in arms},
        "prefix_len": {
            str(p): arms[name_p(p)]["ms"] for p in sorted({*cfg.prefix_lens, cfg.prefix_len}) if name_p(p) in arms
        },
    }


def checkpoint_fraction(mixture: PrefixMixture) -> dict:
    """Size of the safetensors file of trainable_state_dict() over the backbone's weight bytes."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "prefix.safetensors")
        save_file({k: v.contiguous() for k, v in mixture.trainable_state_dict().items()}, path)
        size = os.path.getsize(path)
    backbone = sum(p.numel() * p.element_size() for p in mixture.backbone.parameters())
    return {"checkpoint_bytes": size, "backbone_bytes": backbone, "fraction": size / backbone}


def encoder_group(cfg: BenchConfig) -> Group:
    """Encoder arms: sequence-classification training steps, scaling, and evaluation with dynamic lengths."""
    dev = cfg.device
    backbone = to_bench(load_encoder(cfg.encoder), cfg)
    full_copy, peft_copy = copy.deepcopy(backbone), copy.deepcopy(backbone)
    vocab, width = backbone.config.vocab_size, backbone.config.hidden_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, cfg.enc_batch, cfg.seq_len, pad=True, seed=cfg.seed))
    labels = torch.randint(0, 2, (cfg.enc_batch,), generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    tokens = ids.numel()
    torch.manual_seed(cfg.seed)
    head0 = to_bench(nn.Linear(width, 2), cfg)
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "padding": float(1 - mask.float().mean())}

    # Prefix arms share this backbone; called without a prefix state, moe_prefix's attention function hands
    # straight to sdpa, so the frozen forward and the floor run the same kernels as the prefix arms.
    arms.append(frozen_forward_arm(backbone, tokens, input_ids=ids, attention_mask=mask))

    def floor_arm(dropout: bool):
        """Forward + backward to inputs_embeds through the frozen model, with or without its dropout."""
        head = copy.deepcopy(head0)

        def floor():
            backbone.train(dropout)
            head.zero_grad(set_to_none=True)
            embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
            out = backbone(inputs_embeds=embeds, attention_mask=mask)
            pooled_loss(out.last_hidden_state, mask, head, labels).backward()

        return floor

    # The floor of any prefix method: the backward must cross every frozen layer to reach layer 0's prefix.
    arms.append(Arm("backward_floor", floor_arm(True), tokens, info={"note": "forward + backward to inputs_embeds"}))

    def peft_probe(pm):
        pm(input_ids=ids[:2], attention_mask=mask[:2])

    peft_head = copy.deepcopy(head0)

    def peft_loss(pm):
        out = pm(input_ids=ids, attention_mask=mask)
        return pooled_loss(out.last_hidden_state, mask, peft_head, labels)

    arm, err = peft_prefix_arm(
        peft_copy, "FEATURE_EXTRACTION", cfg.prefix_len, peft_probe, peft_loss, tokens, peft_head
    )
    if arm is not None:
        arms.append(arm)
    else:
        notes["peft_feature_extraction_error"] = err
    # The usual sequence-classification route (a model with its own classifier, task_type=SEQ_CLS).
    from transformers import AutoModelForSequenceClassification

    seq_cls = AutoModelForSequenceClassification.from_config(backbone.config)
    _, seq_err = try_peft(seq_cls, "SEQ_CLS", cfg.prefix_len, lambda m: m(input_ids=ids[:2].cpu()))
    notes["peft_seq_cls_error"] = seq_err
    del seq_cls

    def mixture_arm(name: str, pcfg: PrefixConfig, dropout: bool = True) -> tuple[Arm, PrefixMixture]:
        mixture = to_bench(attach(backbone, pcfg), cfg)
        head = copy.deepcopy(head0)
        params = trainable_params(mixture, head)

        def loss():
            mixture.train()
            if not dropout:
                mixture.backbone.eval()  # router noise stays on; only the backbone's dropout goes
            out = mixture(input_ids=ids, attention_mask=mask)
            return pooled_loss(out.last_hidden_state, mask, head, labels) + out.routing.aux_loss

        return Arm(name, train_step(params, loss), tokens, count_params(params)), mixture

    for name, pcfg in {**prefix_configs(cfg), **scaling_configs(cfg)}.items():
        arm, mixture = mixture_arm(name, pcfg)
        arms.append(arm)
        if name == "moe4_top2_blend":
            notes["checkpoint"] = checkpoint_fraction(mixture)

    # The same floor and step with the backbone's dropout off: in training mode dropout draws a mask
    # per attention matrix and moves SDPA off its fused CPU kernel, which raises the floor itself.
    arms.append(Arm("backward_floor_nodrop", floor_arm(False), tokens, info={"note": "floor, backbone dropout off"}))
    arm, _ = mixture_arm("moe4_top2_blend_nodrop", prefix_configs(cfg)["moe4_top2_blend"], dropout=False)
    arms.append(arm)
    # Both attention paths side by side (moe_prefix/injection.py), where the split applies: no attention dropout.
    for path in ("split", "joint"):
        pcfg = replace(prefix_configs(cfg)["moe4_top2_blend"], attention_path=path)
        arms.append(mixture_arm(f"moe4_top2_blend_nodrop_{path}", pcfg, dropout=False)[0])

    for p in full_copy.parameters():
        p.requires_grad_(True)
    full_head = copy.deepcopy(head0)
    full_params = trainable_params(full_copy, full_head)

    def full_loss():
        full_copy.train()
        out = full_copy(input_ids=ids, attention_mask=mask)
        return pooled_loss(out.last_hidden_state, mask, full_head, labels)

    arms.append(Arm("full_ft", train_step(full_params, full_loss), tokens, count_params(full_params)))

    # Evaluation: learned lengths made short through the length head's bias, against the static maximum.
    P = cfg.eval_max_len
    static = to_bench(attach(backbone, PrefixConfig(num_experts=4, prefix_len=P, top_k=2)), cfg).eval()
    dynamic = to_bench(attach(backbone, PrefixConfig(num_experts=4, prefix_len=P, top_k=2, length="learned")), cfg)
    dynamic.eval()
    linear = dynamic.length.head[1]
    with torch.no_grad():
        frac = (cfg.eval_mean_len - dynamic.cfg.min_len) / (P - dynamic.cfg.min_len)
        linear.bias.fill_(math.log(frac / (1 - frac)))
        # features are layer-normed (unit variance per dim): this spreads the logit with std 0.5. Drawn on the
        # CPU (a seeded CPU generator cannot fill a CUDA tensor), then copied to wherever the head lives.
        g = torch.Generator().manual_seed(cfg.seed)
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * (0.5 / width**0.5))
        routing = dynamic(input_ids=ids, attention_mask=mask).routing
    lengths = routing.lengths.round()
    notes["eval_lengths"] = {
        "static": P,
        "mean": float(lengths.mean()),
        "min": float(lengths.min()),
        "max_kept": float(lengths.max()),
    }

    def evaluate(mixture):
        def run():
            mixture.eval()  # the backbone is shared with training arms, which leave it in train mode
            with torch.no_grad():
                mixture(input_ids=ids, attention_mask=mask)

        return run

    arms.append(Arm("eval_static", evaluate(static), tokens, info={"prefix_len": P}))
    arms.append(Arm("eval_dynamic", evaluate(dynamic), tokens, info=notes["eval_lengths"]))
    return Group("encoder", arms, notes)


def decoder_group(cfg: BenchConfig) -> Group:
    """Decoder arms: LM training steps (PEFT included) and generation with and without a prefix."""
    dev = cfg.device
    backbone = to_bench(load_decoder(cfg.decoder), cfg)
    full_copy, peft_copy = copy.deepcopy(backbone), copy.deepcopy(backbone)
    vocab = backbone.config.vocab_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, cfg.dec_batch, cfg.seq_len, pad=False, seed=cfg.seed))
    labels = ids.masked_fill(mask == 0, -100)
    tokens = ids.numel()
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape)}

    arms.append(frozen_forward_arm(backbone, tokens, input_ids=ids, attention_mask=mask))

    def floor():
        backbone.train()
        embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
        backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()

    arms.append(Arm("backward_floor", floor, tokens, info={"note": "forward + backward to inputs_embeds"}))

    arm, err = peft_prefix_arm(
        peft_copy,
        "CAUSAL_LM",
        cfg.prefix_len,
        lambda m: m(input_ids=ids[:1], attention_mask=mask[:1]),
        lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss,
        tokens,
    )
    if arm is not None:
        arms.append(arm)
    else:
        notes["peft_causal_lm_error"] = err

    mixtures = {}
    configs = prefix_configs(cfg)
    # Both attention paths side by side (moe_prefix/injection.py) for the headline arms.
    for name in ("moe1", "moe4_top2_blend"):
        for path in ("split", "joint"):
            configs[f"{name}_{path}"] = replace(configs[name], attention_path=path)
    for name, pcfg in configs.items():
        mixture = to_bench(attach(backbone, pcfg), cfg)
        mixtures[name] = mixture
        params = trainable_params(mixture)

        def loss(mixture=mixture):
            mixture.train()
            out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
            return out.loss + out.routing.aux_loss

        arms.append(Arm(name, train_step(params, loss), tokens, count_params(params)))
    notes["checkpoint"] = checkpoint_fraction(mixtures["moe4_top2_blend"])

    for p in full_copy.parameters():
        p.requires_grad_(True)
    full_params = trainable_params(full_copy)

    def full_loss():
        full_copy.train()
        return full_copy(input_ids=ids, attention_mask=mask, labels=labels).loss

    arms.append(Arm("full_ft", train_step(full_params, full_loss), tokens, count_params(full_params)))

    # Generation: the same backbone, with (mixture.generate) and without (model.generate) a prefix.
    prompt, pmask = (x.to(dev) for x in make_batch(vocab, cfg.gen_batch, cfg.gen_prompt, pad=False, seed=cfg.seed + 1))
    n = cfg.gen_tokens
    gen_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    generator = mixtures["moe4_top2_blend"]

    def generate_plain():
        backbone.eval()
        with torch.no_grad():
            backbone.generate(input_ids=prompt, attention_mask=pmask, **gen_kwargs)

    def generate_prefix():
        generator.eval()
        generator.generate(input_ids=prompt, attention_mask=pmask, **gen_kwargs)

    arms.append(Arm("generate_plain", generate_plain, cfg.gen_batch * n))
    arms.append(Arm("generate_prefix", generate_prefix, cfg.gen_batch * n, info={"prefix_len": cfg.prefix_len}))
    return Group("decoder", arms, notes)


def run_group(group: Group, cfg: BenchConfig, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    log(f"[{group.name}] {len(group.arms)} arms, {cfg.warmup} warm-up + {cfg.reps} repetitions")
    start = time.perf_counter()
    times = time_interleaved(group.arms, cfg.reps, cfg.warmup, cfg.device)
    log(f"[{group.name}] timed in {time.perf_counter() - start:.0f} s")
    summary = {arm.name: summarise(arm, times["wall"][arm.name], times["cpu"][arm.name]) for arm in group.arms}
    if cfg.memory:
        for arm in group.arms:
            summary[arm.name]["peak_mb"] = peak_memory_mb(arm.fn, cfg.device)
    return summary, times


def ratios(enc_times: dict, dec_times: dict, notes: dict) -> dict:
    """Every reported ratio from one clock's per-repetition times of the two groups."""
    return {
        "moe1_vs_peft": paired_ratio(dec_times, "moe1", "peft_prefix"),
        "moe4_top2_vs_peft": paired_ratio(dec_times, "moe4_top2_blend", "peft_prefix"),
        "e64_vs_e4": paired_ratio(enc_times, "E64", "moe4_top2_blend"),
        "step_vs_forward": paired_ratio(enc_times, "moe4_top2_blend", "frozen_forward"),
        "checkpoint_fraction": notes["encoder"]["checkpoint"]["fraction"],
        # context for the targets above
        "floor_vs_forward": paired_ratio(enc_times, "backward_floor", "frozen_forward"),
        "step_vs_forward_nodrop": paired_ratio(enc_times, "moe4_top2_blend_nodrop", "frozen_forward"),
        "floor_vs_forward_nodrop": paired_ratio(enc_times, "backward_floor_nodrop", "frozen_forward"),
        "step_vs_floor": paired_ratio(enc_times, "moe4_top2_blend", "backward_floor"),
        "moe4_top2_concat_vs_peft": paired_ratio(dec_times, "moe4_top2_concat", "peft_prefix"),
        "encoder_moe1_vs_peft": paired_ratio(enc_times, "moe1", "peft_prefix"),
        "encoder_moe4_top2_vs_peft": paired_ratio(enc_times, "moe4_top2_blend", "peft_prefix"),
        "decoder_step_vs_forward": paired_ratio(dec_times, "moe4_top2_blend", "frozen_forward"),
        "eval_dynamic_vs_static": paired_ratio(enc_times, "eval_dynamic", "eval_static"),
        "generate_prefix_vs_plain": paired_ratio(dec_times, "generate_prefix", "generate_plain"),
        # the two attention paths (auto picks split on CUDA, joint on the CPU)
        "decoder_moe1_split_vs_joint": paired_ratio(dec_times, "moe1_split", "moe1_joint"),
        "decoder_moe4_top2_split_vs_joint": paired_ratio(dec_times, "moe4_top2_blend_split", "moe4_top2_blend_joint"),
        "encoder_moe4_top2_nodrop_split_vs_joint": paired_ratio(
            enc_times, "moe4_top2_blend_nodrop_split", "moe4_top2_blend_nodrop_joint"
        ),
        "moe1_split_vs_peft": paired_ratio(dec_times, "moe1_split", "peft_prefix"),
        "moe4_top2_split_vs_peft": paired_ratio(dec_times, "moe4_top2_blend_split", "peft_prefix"),
    }


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Build, time and profile both groups; returns everything --json writes."""
    torch.manual_seed(cfg.seed)
    started = time.time()
    results: dict = {"config": asdict(cfg), "groups": {}, "notes": {}}
    all_times = {}
    for build in (encoder_group, decoder_group):
        t0 = time.perf_counter()
        group = build(cfg)
        log(f"[{group.name}] built in {time.perf_counter() - t0:.0f} s")
        summary, times = run_group(group, cfg, log)
        results["groups"][group.name] = summary
        results["notes"][group.name] = group.notes
        all_times[group.name] = times
        del group
        gc.collect()
    by_clock = {c: ratios(all_times["encoder"][c], all_times["decoder"][c], results["notes"]) for c in CLOCKS}
    r = results["ratios"] = by_clock[cfg.clock]
    other = next(c for c in CLOCKS if c != cfg.clock)
    results[f"ratios_{other}_clock"] = by_clock[other]
    results["scaling"] = _scaling_table(cfg, results["groups"]["encoder"])
    results["targets"] = TARGETS
    results["met"] = {
        k: (None if r[k] is None else (r[k] < v if k == "checkpoint_fraction" else r[k] <= v))
        for k, v in TARGETS.items()
    }
    results["machine"] = machine()
    results["wall_s"] = time.time() - started
    return results


def format_report(results: dict) -> str:
    """The figures as plain-text tables."""
    lines = []
    for gname, arms in results["groups"].items():
        lines.append(f"\n{gname}  (batch {results['notes'][gname]['batch']})")
        lines.append(
            f"{'arm':22s} {'ms':>9s} {'cpu ms':>9s} {'spread':>7s} {'tokens/s':>10s} {'peak MB':>8s} {'trainable':>11s}"
        )
        for name, a in arms.items():
            peak = f"{a['peak_mb']:8.1f}" if "peak_mb" in a else f"{'-':>8s}"
            lines.append(
                f"{name:22s} {a['ms']:9.1f} {a['cpu_ms']:9.1f} {a['spread']:7.2f} {a['tokens_per_s']:10.0f} {peak} "
                f"{a['trainable']:11,d}"
            )
        for key, value in results["notes"][gname].items():
            if key != "batch":
                lines.append(f"  {key}: {value}")
    s = results["scaling"]
    if s:  # presets have no scaling arms
        lines.append(f"\nscaling (encoder, top-2 blend, ms/step): E {s['experts']}  P {s['prefix_len']}")
    clock = results["config"]["clock"]
    other = next(c for c in CLOCKS if c != clock)
    lines.append(f"\nratios (median of per-repetition paired ratios, {clock} clock; {other} clock in brackets)")
    for key, value in results["ratios"].items():
        target = results["targets"].get(key)
        mark = ""
        if target is not None and value is not None:
            mark = f"  target {'<' if key == 'checkpoint_fraction' else '<='} {target}: "
            mark += "met" if results["met"][key] else "MISSED"
        shown = "n/a" if value is None else f"{value:.4f}"
        alt = results[f"ratios_{other}_clock"][key]
        shown += "" if alt is None or alt == value else f" ({alt:.4f})"
        lines.append(f"  {key:28s} {shown}{mark}")
    m = results["machine"]
    lines.append(
        f"\ntorch {m['torch']}, {m['threads']} threads, {m['cpus']} cpus, load {m['load_avg']}, "
        f"wall {results['wall_s']:.0f} s"
    )
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """The per-arm tables and the ratios as Markdown (the body of docs/benchmarks.md)."""
    out = []
    for gname, arms in results["groups"].items():
        out.append(f"\n#### {gname} (batch {' x '.join(map(str, results['notes'][gname]['batch']))})\n")
        out.append("| arm | ms/call (median) | cpu ms | spread | tokens/s | peak MB | trainable params |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, a in arms.items():
            peak = f"{a['peak_mb']:.0f}" if "peak_mb" in a else "-"
            speed = f"{a['ms']:.0f} | {a['cpu_ms']:.0f} | {a['spread']:.2f} | {a['tokens_per_s']:.0f}"
            out.append(f"| {name} | {speed} | {peak} | {a['trainable']:,} |")
    clock = results["config"]["clock"]
    other = next(c for c in CLOCKS if c != clock)
    out.append(f"\n| ratio | {clock} clock | {other} clock | target |")
    out.append("|---|---:|---:|---|")
    for key, value in results["ratios"].items():
        target = results["targets"].get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        if target is None:
            verdict = ""
        else:
            sign = "<" if key == "checkpoint_fraction" else "≤"
            verdict = f"{sign} {target}: {'met' if results['met'][key] else '**missed**'}"
        alt = results[f"ratios_{other}_clock"][key]
        alt = "n/a" if alt is None else f"{alt:.3f}"
        out.append(f"| {key} | {shown} | {alt} | {verdict} |")
    return "\n".join(out)
