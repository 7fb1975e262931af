"""Speed and memory of prefix methods on a real encoder and a grouped-query decoder.

The numbers behind docs/benchmarks.md; `scripts/bench.py` is the command line. Every figure comes from
one process, measured like this (and why):

- Arms share a group (one backbone family). Every arm is built once and kept; each repetition runs every
  arm of the group once, round-robin, starting one arm later each repetition, so a burst of machine noise
  falls on all arms alike instead of on whichever arm happened to run during it.
- Warm-up repetitions first: oneDNN picks kernels, the allocator grows, AdamW builds its state lazily.
- Figures are medians over repetitions. A ratio A/B is the median of the per-repetition ratios
  A_r / B_r: both halves of a pair ran seconds apart, so a slow drift of the machine's speed cancels.
- A training step is zero_grad + forward + backward + AdamW step on the arm's trainable parameters, with
  the model in training mode (dropout on, router noise on), as in a real fit.
- Peak memory: one extra call per arm under torch.profiler(profile_memory=True). The CPU allocator
  reports every allocation made during the call (+bytes) and its free (-bytes); the maximum of their
  running sum is the peak memory the call allocates: activations kept for backward, gradients,
  temporaries. Frees of tensors older than the call are not reported, so the previous step's gradients
  do not offset this step's. Weights and optimiser state persist between steps and are not in it; they
  are `persistent_mb` = trainable parameters x (weight + two AdamW moments). On CUDA the peak is
  `max_memory_allocated` over the call, minus what was allocated before it. Process RSS is not used:
  malloc keeps freed pages, so an RSS delta depends on which arm ran before.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_prefix.config import PrefixConfig
from moe_prefix.mixture import PrefixMixture, attach

CLOCKS = ("wall", "cpu")
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


@dataclass
class Arm:
    """One thing to time: fn() runs one unit (a step, a forward, a generate call)."""

    name: str
    fn: Callable[[], object]
    tokens: int  # token positions per call (padding included) or new tokens for generation
    trainable: int = 0  # trainable parameters (0 for no-grad arms)
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(arms: Sequence[Arm], reps: int, warmup: int, device: str = "cpu") -> dict[str, dict]:
    """Seconds per call of every arm and repetition, on both clocks: {"wall"|"cpu": {arm: [s, ...]}}.

    Arms run round-robin inside each repetition. "cpu" is this process's CPU time: with one thread it
    equals wall time on an idle machine but leaves out the time other processes held the core.
    """
    for _ in range(warmup):
        for arm in arms:
            arm.fn()
    times: dict[str, dict[str, list[float]]] = {clock: {arm.name: [] for arm in arms} for clock in CLOCKS}
    n = len(arms)
    for r in range(reps):
        gc.collect()
        order = [arms[(r + i) % n] for i in range(n)]
        for arm in order:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            arm.fn()
            _sync(device)
            times["cpu"][arm.name].append(time.process_time() - cpu)
            times["wall"][arm.name].append(time.perf_counter() - wall)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over repetitions of time(a) / time(b), both from the same repetition."""
    if a not in times or b not in times:
        return None
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory one call allocates above what was live at its start (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def summarise(arm: Arm, seconds: list[float], cpu_seconds: list[float]) -> dict:
    """Figures of one arm; "ms" and tokens/s are from the wall clock (medians)."""
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [med, med, med]
    return {
        "ms": 1e3 * med,
        "min_ms": 1e3 * min(seconds),
        "cpu_ms": 1e3 * statistics.median(cpu_seconds),
        "spread": (q[2] - q[0]) / med,  # interquartile range over the median
        "tokens_per_s": arm.tokens / med,
        "trainable": arm.trainable,
        "persistent_mb": 3 * arm.trainable * 4 / 2**20 if arm.trainable else 0.0,
        "times_ms": [1e3 * s for s in seconds],
        **arm.info,
    }


# ---------------------------------------------------------------------------------------------------
# backbones and batches


def load_encoder(name: str) -> nn.Module:
    """A bare encoder (BertModel-like: returns last_hidden_state)."""
    from transformers import AutoModel, BertConfig, BertModel

    sizes = {
        "tiny-bert": dict(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
        # MiniLM's geometry and dropout (the `minilm` asset) with random weights: step times need no weights,
        # and a machine without the asset cache (a GPU box) can still time it.
        "minilm-config": dict(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        ),
    }
    if name in sizes:
        torch.manual_seed(0)
        return BertModel(BertConfig(**sizes[name], max_position_embeddings=512))
    from moe_prefix.train.assets import resolve_backbone

    return AutoModel.from_pretrained(resolve_backbone(name))


def load_decoder(name: str) -> nn.Module:
    """A causal LM: tiny configs are built in place, anything else is resolved as an asset."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = {
        "wide-llama": dict(
            vocab_size=8192,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1376,
        ),
        "tiny-llama": dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        ),
        # TinyLlama-1.1B's geometry (32 query / 4 key-value heads), built from its config: no weights needed
        "llama-1.1b": dict(
            vocab_size=32000,
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
        ),
    }
    if name in sizes:
        torch.manual_seed(0)
        cfg = LlamaConfig(**sizes[name], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg)
    from moe_prefix.train.assets import resolve_backbone

    return AutoModelForCausalLM.from_pretrained(resolve_backbone(name))


def make_batch(vocab: int, b: int, t: int, pad: bool, seed: int) -> tuple[Tensor, Tensor]:
    """Random ids (b t) and mask; with pad, row lengths are uniform in t/2..t (row 0 full), right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# steps


def _pooled_loss(hidden: Tensor, mask: Tensor, head: nn.Module, labels: Tensor) -> Tensor:
    """Sequence classification: masked mean of the last hidden state, a linear head, cross-entropy."""
    w = mask.to(hidden.dtype)[..., None]
    pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    return F.cross_entropy(head(pooled).float(), labels)


def train_step(params: list[nn.Parameter], loss_fn: Callable[[], Tensor], lr: float = 1e-4):
    """zero_grad + forward + backward + AdamW step, as one callable."""
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


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


def _try_peft(model: nn.Module, task_type: str, P: int, probe: Callable[[nn.Module], object]):
    """get_peft_model + one call of probe; returns (peft model, None) or (None, error text)."""
    try:
        import peft
    except ImportError as err:
        return None, f"peft not installed ({err})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P))
            probe(pm)
        return pm, None
    except Exception as err:  # noqa: BLE001 - we report whatever PEFT raises, verbatim
        return None, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------------
# groups


@dataclass
class Group:
    name: str
    arms: list[Arm]
    notes: dict = field(default_factory=dict)  # errors, checkpoint sizes, eval lengths ...


def _to(module: nn.Module, cfg: BenchConfig) -> nn.Module:
    return module.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def encoder_group(cfg: BenchConfig) -> Group:
    """Encoder arms: sequence-classification training steps, scaling, and evaluation with dynamic lengths."""
    dev = cfg.device
    backbone = _to(load_encoder(cfg.encoder), cfg)
    full_copy, peft_copy = copy.deepcopy(backbone), copy.deepcopy(backbone)
    vocab, width = backbone.config.vocab_size, backbone.config.hidden_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, cfg.enc_batch, cfg.seq_len, pad=True, seed=cfg.seed))
    labels = torch.randint(0, 2, (cfg.enc_batch,), generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    tokens = ids.numel()
    torch.manual_seed(cfg.seed)
    head0 = _to(nn.Linear(width, 2), cfg)
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "padding": float(1 - mask.float().mean())}

    # Prefix arms share this backbone; called without a prefix state, moe_prefix's attention function hands
    # straight to sdpa, so the frozen forward and the floor run the same kernels as the prefix arms.
    def frozen_forward():
        backbone.eval()
        with torch.no_grad():
            backbone(input_ids=ids, attention_mask=mask)

    arms.append(Arm("frozen_forward", frozen_forward, tokens))

    def floor_arm(dropout: bool):
        """Forward + backward to inputs_embeds through the frozen model, with or without its dropout."""
        head = copy.deepcopy(head0)

        def floor():
            backbone.train(dropout)
            head.zero_grad(set_to_none=True)
            embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
            out = backbone(inputs_embeds=embeds, attention_mask=mask)
            _pooled_loss(out.last_hidden_state, mask, head, labels).backward()

        return floor

    # The floor of any prefix method: the backward must cross every frozen layer to reach layer 0's prefix.
    arms.append(Arm("backward_floor", floor_arm(True), tokens, info={"note": "forward + backward to inputs_embeds"}))

    def peft_probe(pm):
        pm(input_ids=ids[:2], attention_mask=mask[:2])

    for p in peft_copy.parameters():
        p.requires_grad_(False)
    pm, err = _try_peft(peft_copy, "FEATURE_EXTRACTION", cfg.prefix_len, peft_probe)
    if pm is not None:
        peft_head = copy.deepcopy(head0)
        params = _trainable(pm, peft_head)

        def peft_loss():
            pm.train()
            out = pm(input_ids=ids, attention_mask=mask)
            return _pooled_loss(out.last_hidden_state, mask, peft_head, labels)

        arms.append(Arm("peft_prefix", train_step(params, peft_loss), tokens, _count(params)))
    else:
        notes["peft_feature_extraction_error"] = err
    # The usual sequence-classification route (a model with its own classifier, task_type=SEQ_CLS).
    from transformers import AutoModelForSequenceClassification

    seq_cls = AutoModelForSequenceClassification.from_config(backbone.config)
    _, seq_err = _try_peft(seq_cls, "SEQ_CLS", cfg.prefix_len, lambda m: m(input_ids=ids[:2].cpu()))
    notes["peft_seq_cls_error"] = seq_err
    del seq_cls

    def mixture_arm(name: str, pcfg: PrefixConfig, dropout: bool = True) -> tuple[Arm, PrefixMixture]:
        mixture = _to(attach(backbone, pcfg), cfg)
        head = copy.deepcopy(head0)
        params = _trainable(mixture, head)

        def loss():
            mixture.train()
            if not dropout:
                mixture.backbone.eval()  # router noise stays on; only the backbone's dropout goes
            out = mixture(input_ids=ids, attention_mask=mask)
            return _pooled_loss(out.last_hidden_state, mask, head, labels) + out.routing.aux_loss

        return Arm(name, train_step(params, loss), tokens, _count(params)), mixture

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
    full_params = _trainable(full_copy, full_head)

    def full_loss():
        full_copy.train()
        out = full_copy(input_ids=ids, attention_mask=mask)
        return _pooled_loss(out.last_hidden_state, mask, full_head, labels)

    arms.append(Arm("full_ft", train_step(full_params, full_loss), tokens, _count(full_params)))

    # Evaluation: learned lengths made short through the length head's bias, against the static maximum.
    P = cfg.eval_max_len
    static = _to(attach(backbone, PrefixConfig(num_experts=4, prefix_len=P, top_k=2)), cfg).eval()
    dynamic = _to(attach(backbone, PrefixConfig(num_experts=4, prefix_len=P, top_k=2, length="learned")), cfg)
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
    backbone = _to(load_decoder(cfg.decoder), cfg)
    full_copy, peft_copy = copy.deepcopy(backbone), copy.deepcopy(backbone)
    vocab = backbone.config.vocab_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, cfg.dec_batch, cfg.seq_len, pad=False, seed=cfg.seed))
    labels = ids.masked_fill(mask == 0, -100)
    tokens = ids.numel()
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape)}

    def frozen_forward():
        backbone.eval()
        with torch.no_grad():
            backbone(input_ids=ids, attention_mask=mask)

    arms.append(Arm("frozen_forward", frozen_forward, tokens))

    def floor():
        backbone.train()
        embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
        backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()

    arms.append(Arm("backward_floor", floor, tokens, info={"note": "forward + backward to inputs_embeds"}))

    pm, err = _try_peft(peft_copy, "CAUSAL_LM", cfg.prefix_len, lambda m: m(input_ids=ids[:1], attention_mask=mask[:1]))
    if pm is not None:
        params = _trainable(pm)

        def peft_loss():
            pm.train()
            return pm(input_ids=ids, attention_mask=mask, labels=labels).loss

        arms.append(Arm("peft_prefix", train_step(params, peft_loss), tokens, _count(params)))
    else:
        notes["peft_causal_lm_error"] = err

    mixtures = {}
    configs = prefix_configs(cfg)
    # Both attention paths side by side (moe_prefix/injection.py) for the headline arms.
    for name in ("moe1", "moe4_top2_blend"):
        for path in ("split", "joint"):
            configs[f"{name}_{path}"] = replace(configs[name], attention_path=path)
    for name, pcfg in configs.items():
        mixture = _to(attach(backbone, pcfg), cfg)
        mixtures[name] = mixture
        params = _trainable(mixture)

        def loss(mixture=mixture):
            mixture.train()
            out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
            return out.loss + out.routing.aux_loss

        arms.append(Arm(name, train_step(params, loss), tokens, _count(params)))
    notes["checkpoint"] = checkpoint_fraction(mixtures["moe4_top2_blend"])

    for p in full_copy.parameters():
        p.requires_grad_(True)
    full_params = _trainable(full_copy)

    def full_loss():
        full_copy.train()
        return full_copy(input_ids=ids, attention_mask=mask, labels=labels).loss

    arms.append(Arm("full_ft", train_step(full_params, full_loss), tokens, _count(full_params)))

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


# ---------------------------------------------------------------------------------------------------
# the whole benchmark


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


# ---------------------------------------------------------------------------------------------------
# presets: `--preset gpu`


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
        backbone = _to((load_decoder if spec.decoder else load_encoder)(spec.model), cfg)
    peft_copy = copy.deepcopy(backbone)
    pad = not spec.decoder
    ids, mask = (x.to(dev) for x in make_batch(backbone.config.vocab_size, spec.batch, spec.seq_len, pad, cfg.seed))
    tokens = ids.numel()
    g = torch.Generator().manual_seed(cfg.seed)
    labels = ids.masked_fill(mask == 0, -100) if spec.decoder else torch.randint(0, 2, (spec.batch,), generator=g)
    labels = labels.to(dev)
    torch.manual_seed(cfg.seed)
    head0 = None if spec.decoder else _to(nn.Linear(backbone.config.hidden_size, 2), cfg)
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "padding": float(1 - mask.float().mean()), "model": spec.model}

    def loss_of(model, head, **inputs):
        inputs = inputs or {"input_ids": ids}
        if spec.decoder:
            out = model(**inputs, attention_mask=mask, labels=labels)
            loss = out.loss
        else:
            out = model(**inputs, attention_mask=mask)
            loss = _pooled_loss(out.last_hidden_state, mask, head, labels)
        routing = getattr(out, "routing", None)
        return loss if routing is None else loss + routing.aux_loss

    def frozen_forward():
        backbone.eval()
        with torch.no_grad():
            backbone(input_ids=ids, attention_mask=mask)

    arms.append(Arm("frozen_forward", frozen_forward, tokens))

    def floor_arm(dropout: bool):
        head = copy.deepcopy(head0)

        def floor():
            backbone.train(dropout)
            embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
            loss_of(backbone, head, inputs_embeds=embeds).backward()

        return floor

    arms.append(Arm("backward_floor", floor_arm(True), tokens, info={"note": "forward + backward to inputs_embeds"}))

    for p in peft_copy.parameters():
        p.requires_grad_(False)
    task = "CAUSAL_LM" if spec.decoder else "FEATURE_EXTRACTION"
    pm, err = _try_peft(peft_copy, task, cfg.prefix_len, lambda m: m(input_ids=ids[:2], attention_mask=mask[:2]))
    if pm is not None:
        peft_head = copy.deepcopy(head0)
        params = _trainable(pm, *([peft_head] if peft_head is not None else []))

        def peft_loss():
            pm.train()
            return loss_of(pm, peft_head)

        arms.append(Arm("peft_prefix", train_step(params, peft_loss), tokens, _count(params)))
    else:
        notes["peft_error"] = err

    def mixture_arm(name: str, pcfg: PrefixConfig, dropout: bool = True) -> Arm:
        mixture = _to(attach(backbone, pcfg), cfg)
        head = copy.deepcopy(head0)
        params = _trainable(mixture, *([head] if head is not None else []))

        def loss():
            mixture.train()
            if not dropout:
                mixture.backbone.eval()  # router noise stays on; only the backbone's dropout goes
            return loss_of(mixture, head)

        return Arm(name, train_step(params, loss), tokens, _count(params), info={"path": pcfg.attention_path})

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


def load_seq2seq(name: str) -> nn.Module:
    """An encoder-decoder LM: BART-base's or a tiny BART's geometry from a config, else an asset or folder."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration

    sizes = {
        # facebook/bart-base: 6 + 6 layers, 768 wide, 12 heads, FFN 3072, vocabulary 50265, dropout 0.1
        "bart-base-config": dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                 encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                 decoder_ffn_dim=3072, max_position_embeddings=1024, dropout=0.1),
        "tiny-bart": dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=128),
    }  # fmt: skip
    if name in sizes:
        torch.manual_seed(0)
        return BartForConditionalGeneration(BartConfig(**sizes[name], pad_token_id=1, bos_token_id=0, eos_token_id=2))
    from moe_prefix.train.assets import resolve_backbone

    return AutoModelForSeq2SeqLM.from_pretrained(resolve_backbone(name))


def seq2seq_group(spec: PresetGroup, cfg: BenchConfig) -> Group:
    """Seq2seq LM training steps: PEFT's prefix (it reaches decoder self-attention only, moe_prefix/peft_interop.py),
    moe1 on that site alone (like for like), and moe1 / moe4 top-2 blend on all three sites (Li & Liang's layout).

    Encoder inputs (b t) are right-padded (rows t/2..t long); targets are seq_len // 2 unpadded tokens.
    """
    dev = cfg.device
    backbone = _to(load_seq2seq(spec.model), cfg)
    peft_copy = copy.deepcopy(backbone)
    vocab = backbone.config.vocab_size
    ids, mask = (x.to(dev) for x in make_batch(vocab, spec.batch, spec.seq_len, pad=True, seed=cfg.seed))
    labels = make_batch(vocab, spec.batch, spec.seq_len // 2, pad=False, seed=cfg.seed + 1)[0].to(dev)
    tokens = ids.numel() + labels.numel()
    arms: list[Arm] = []
    notes: dict = {"batch": list(ids.shape), "targets": list(labels.shape), "model": spec.model}

    def frozen_forward():
        backbone.eval()
        with torch.no_grad():
            backbone(input_ids=ids, attention_mask=mask, labels=labels)

    arms.append(Arm("frozen_forward", frozen_forward, tokens))
    for p in peft_copy.parameters():
        p.requires_grad_(False)
    probe = lambda m: m(input_ids=ids[:2], attention_mask=mask[:2], labels=labels[:2])  # noqa: E731
    pm, err = _try_peft(peft_copy, "SEQ_2_SEQ_LM", cfg.prefix_len, probe)
    if pm is not None:
        params = _trainable(pm)

        def peft_loss():
            pm.train()
            return pm(input_ids=ids, attention_mask=mask, labels=labels).loss

        arms.append(Arm("peft_prefix", train_step(params, peft_loss), tokens, _count(params)))
    else:
        notes["peft_error"] = err
    configs = prefix_configs(cfg)
    configs = {
        "moe1_decoder": replace(configs["moe1"], sites=("decoder",)),
        "moe1": configs["moe1"],
        "moe4_top2_blend": configs["moe4_top2_blend"],
    }
    for name, pcfg in configs.items():
        mixture = _to(attach(backbone, pcfg), cfg)
        params = _trainable(mixture)

        def loss(mixture=mixture):
            mixture.train()
            out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
            return out.loss + out.routing.aux_loss

        arms.append(Arm(name, train_step(params, loss), tokens, _count(params), info={"sites": list(pcfg.sites)}))
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


def machine() -> dict:
    import platform

    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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
