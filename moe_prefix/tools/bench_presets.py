"""Benchmark presets: fixed groups at other scales (`--preset gpu`: a 1.1B Llama and MiniLM on CUDA;
`--preset seq2seq`: BART-base's geometry on the CPU), each timed beside PEFT and the backward floor."""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from moe_prefix.config import PrefixConfig
from moe_prefix.mixture import attach
from moe_prefix.tools.bench_models import (
    Group,
    count_params,
    frozen_forward_arm,
    load_decoder,
    load_encoder,
    load_seq2seq,
    make_batch,
    peft_prefix_arm,
    pooled_loss,
    to_bench,
    train_step,
    trainable_params,
)
from moe_prefix.tools.bench_timing import CLOCKS, Arm, machine, paired_ratio
from moe_prefix.tools.benchmark import BenchConfig, prefix_configs, run_group


@dataclass(frozen=True)
class PresetGroup:
    """One backbone and batch of a preset: an LM step on a decoder, or pooled classification on an encoder."""

    name: str
    model: str  # a load_decoder / load_encoder name
    decoder: bool
    batch: int
    seq_len: int  # decoders unpadded (the frozen model runs flash with is_causal); encoders padded as above
    seq2seq: bool = False  # an encoder-decoder LM (`seq2seq_group`): seq_len encoder tokens, seq_len // 2 targets


PRESETS = {
    # GPU scale (issue 14): a 1.1B Llama and MiniLM, both built from configs, so no weights travel to the GPU box
    "gpu": (
        PresetGroup("llama1b_16x256", "llama-1.1b", True, 16, 256),
        PresetGroup("minilm_128x256", "minilm-config", False, 128, 256),
        PresetGroup("minilm_32x64", "minilm-config", False, 32, 64),
    ),
}


PRESETS["seq2seq"] = (  # issue 26: BART-base's geometry from its config, on the CPU, beside PEFT
    PresetGroup("bart_base_4x64", "bart-base-config", False, 4, 64, seq2seq=True),
)
PRESET_SETTINGS = {  # unless given
    "gpu": {"device": "cuda", "dtype": "bfloat16", "reps": 10, "warmup": 3},
    "seq2seq": {"reps": 5, "warmup": 1},
}


PRESET_TARGETS = {  # ratio -> the largest value that meets it
    "gpu": {
        "llama1b_16x256/moe1_vs_peft": 0.95,
        "llama1b_16x256/moe4_top2_vs_peft": 1.0,
        "llama1b_16x256/moe4_top2_vs_floor": 1.08,
        "minilm_128x256/moe4_top2_vs_floor": 1.15,
    },
}


def preset_group(spec: PresetGroup, cfg: BenchConfig) -> Group:
    """Training steps: the backward floor, PEFT, moe1 and moe4 top-2 blend on the auto and the joint path.

    `auto` splits where it applies (CUDA, no attention dropout in training): MiniLM keeps its attention
    dropout of 0.1 in the main arms, so those run joint; the `_nodrop` arms show the split there.
    """
    if spec.seq2seq:
        return seq2seq_group(spec, cfg)
    dev = cfg.device
    with torch.device(dev):  # initialising 1.1B parameters on the host would take minutes
        backbone = to_bench((load_decoder if spec.decoder else load_encoder)(spec.model), cfg)
    peft_copy = copy.deepcopy(backbone)
    pad = not spec.decoder
    ids, mask = (x.to(dev) for x in make_batch(backbone.config.vocab_size, spec.batch, spec.seq_len, pad, cfg.seed))
    tokens = ids.numel()
    g = torch.Generator().manual_seed(cfg.seed)
    labels = ids.masked_fill(mask == 0, -100) if spec.decoder else torch.randint(0, 2, (spec.batch,), generator=g)
    labels = labels.to(dev)
    torch.manual_seed(cfg.seed)
    head0 = None if spec.decoder else to_bench(nn.Linear(backbone.config.hidden_size, 2), cfg)
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "padding": float(1 - mask.float().mean()), "model": spec.model}

    def loss_of(model, head, **inputs):
        inputs = inputs or {"input_ids": ids}
        if spec.decoder:
            out = model(**inputs, attention_mask=mask, labels=labels)
            loss = out.loss
        else:
            out = model(**inputs, attention_mask=mask)
            loss = pooled_loss(out.last_hidden_state, mask, head, labels)
        routing = getattr(out, "routing", None)
        return loss if routing is None else loss + routing.aux_loss

    arms.append(frozen_forward_arm(backbone, tokens, input_ids=ids, attention_mask=mask))

    def floor_arm(dropout: bool):
        head = copy.deepcopy(head0)

        def floor():
            backbone.train(dropout)
            embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
            loss_of(backbone, head, inputs_embeds=embeds).backward()

        return floor

    arms.append(Arm("backward_floor", floor_arm(True), tokens, info={"note": "forward + backward to inputs_embeds"}))

    task = "CAUSAL_LM" if spec.decoder else "FEATURE_EXTRACTION"
    peft_head = copy.deepcopy(head0)
    arm, err = peft_prefix_arm(
        peft_copy,
        task,
        cfg.prefix_len,
        lambda m: m(input_ids=ids[:2], attention_mask=mask[:2]),
        lambda m: loss_of(m, peft_head),
        tokens,
        peft_head,
    )
    if arm is not None:
        arms.append(arm)
    else:
        notes["peft_error"] = err

    def mixture_arm(name: str, pcfg: PrefixConfig, dropout: bool = True) -> Arm:
        mixture = to_bench(attach(backbone, pcfg), cfg)
        head = copy.deepcopy(head0)
        params = trainable_params(mixture, *([head] if head is not None else []))

        def loss():
            mixture.train()
            if not dropout:
                mixture.backbone.eval()  # router noise stays on; only the backbone's dropout goes
            return loss_of(mixture, head)

        return Arm(name, train_step(params, loss), tokens, count_params(params), info={"path": pcfg.attention_path})

    configs = prefix_configs(cfg)
    for name in ("moe1", "moe4_top2_blend"):
        arms.append(mixture_arm(name, configs[name]))
        arms.append(mixture_arm(f"{name}_joint", replace(configs[name], attention_path="joint")))
    if not spec.decoder:
        arms.append(Arm("backward_floor_nodrop", floor_arm(False), tokens, info={"note": "backbone dropout off"}))
        arms.append(mixture_arm("moe4_top2_blend_nodrop", configs["moe4_top2_blend"], dropout=False))
        joint = replace(configs["moe4_top2_blend"], attention_path="joint")
        arms.append(mixture_arm("moe4_top2_blend_nodrop_joint", joint, dropout=False))
    return Group(spec.name, arms, notes)


def seq2seq_group(spec: PresetGroup, cfg: BenchConfig) -> Group:
    """Seq2seq LM training steps: PEFT's prefix (it reaches decoder self-attention only, moe_prefix/peft_interop.py),
    moe1 on that site alone (like for like), and moe1 / moe4 top-2 blend on all three sites (Li & Liang's layout).

    Encoder inputs (b t) are right-padded (rows t/2..t long); targets are seq_len // 2 unpadded tokens.
    """
    dev = cfg.device
    backbone = to_bench(load_seq2seq(spec.model), cfg)
    peft_copy = copy.deepcopy(backbone)
    vocab = backbone.config.vocab_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, spec.batch, spec.seq_len, pad=True, seed=cfg.seed))
    labels = make_batch(vocab, spec.batch, spec.seq_len // 2, pad=False, seed=cfg.seed + 1)[0].to(dev)
    tokens = ids.numel() + labels.numel()
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "targets": list(labels.shape), "model": spec.model}

    arms.append(frozen_forward_arm(backbone, tokens, input_ids=ids, attention_mask=mask, labels=labels))
    arm, err = peft_prefix_arm(
        peft_copy,
        "SEQ_2_SEQ_LM",
        cfg.prefix_len,
        lambda m: m(input_ids=ids[:2], attention_mask=mask[:2], labels=labels[:2]),
        lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss,
        tokens,
    )
    if arm is not None:
        arms.append(arm)
    else:
        notes["peft_error"] = err
    configs = prefix_configs(cfg)
    configs = {
        "moe1_decoder": replace(configs["moe1"], sites=("decoder",)),
        "moe1": configs["moe1"],
        "moe4_top2_blend": configs["moe4_top2_blend"],
    }
    for name, pcfg in configs.items():
        mixture = to_bench(attach(backbone, pcfg), cfg)
        params = trainable_params(mixture)

        def loss(mixture=mixture):
            mixture.train()
            out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
            return out.loss + out.routing.aux_loss

        arms.append(Arm(name, train_step(params, loss), tokens, count_params(params), info={"sites": list(pcfg.sites)}))
    return Group(spec.name, arms, notes)


def preset_ratios(times: dict) -> dict:
    """The ratios of one preset group, from one clock's per-repetition times."""
    pairs = {
        "peft_vs_floor": ("peft_prefix", "backward_floor"),
        "moe1_vs_peft": ("moe1", "peft_prefix"),
        "moe4_top2_vs_peft": ("moe4_top2_blend", "peft_prefix"),
        "moe4_top2_vs_floor": ("moe4_top2_blend", "backward_floor"),
        "moe1_vs_joint": ("moe1", "moe1_joint"),
        "moe4_top2_vs_joint": ("moe4_top2_blend", "moe4_top2_blend_joint"),
        "moe4_top2_joint_vs_peft": ("moe4_top2_blend_joint", "peft_prefix"),
        "moe4_top2_nodrop_vs_floor_nodrop": ("moe4_top2_blend_nodrop", "backward_floor_nodrop"),
        "moe4_top2_nodrop_vs_joint": ("moe4_top2_blend_nodrop", "moe4_top2_blend_nodrop_joint"),
        "moe1_decoder_vs_peft": ("moe1_decoder", "peft_prefix"),  # seq2seq: PEFT's one site, like for like
        "moe4_top2_vs_forward": ("moe4_top2_blend", "frozen_forward"),
    }
    return {key: paired_ratio(times, a, b) for key, (a, b) in pairs.items() if a in times and b in times}


def run_preset(
    name: str, cfg: BenchConfig, log: Callable[[str], None] = print, groups: Sequence[PresetGroup] | None = None
) -> dict:
    """Build, time and profile a preset's groups (groups: other sizes, for tests); the same keys as `run`."""
    started = time.time()
    results: dict = {"config": asdict(cfg), "preset": name, "groups": {}, "notes": {}, "scaling": {}}
    by_clock: dict[str, dict] = {clock: {} for clock in CLOCKS}
    for spec in groups or PRESETS[name]:
        t0 = time.perf_counter()
        group = preset_group(spec, cfg)
        log(f"[{group.name}] built in {time.perf_counter() - t0:.0f} s")
        summary, times = run_group(group, cfg, log)
        results["groups"][group.name] = summary
        results["notes"][group.name] = group.notes
        for clock in CLOCKS:
            by_clock[clock].update({f"{group.name}/{k}": v for k, v in preset_ratios(times[clock]).items()})
        del group
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    r = results["ratios"] = by_clock[cfg.clock]
    other = next(c for c in CLOCKS if c != cfg.clock)
    results[f"ratios_{other}_clock"] = by_clock[other]
    results["targets"] = targets = {k: v for k, v in PRESET_TARGETS.get(name, {}).items() if k in r}
    results["met"] = {k: (None if r[k] is None else r[k] <= v) for k, v in targets.items()}
    results["machine"] = machine()
    results["wall_s"] = time.time() - started
    return results
