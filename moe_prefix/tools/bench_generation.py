"""Where a generation run's time goes, each part measured two ways side by side (`moe-prefix bench --gem4 CONFIG`):

- a training step (forward, backward, AdamW on what the method trains) with logits at every position, as the
  backbone computes them unasked, against logits at the scored target positions only (`CausalLM(logits_at=)`,
  what training does);
- the validation loss pass and greedy decoding of the same inputs in split order against longest first (what
  `GenerationData.val_dataloader` does).

Arms are timed by `bench_timing.time_interleaved` (round-robin repetitions, medians, paired ratios). Each
training arm steps through the first `steps` batches of the run's seeded training order, one batch a call, so
both arms of a repetition see the same batch. The figures decide the gem4 study's budget (docs/gem4.md).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_prefix.tools.bench_models import train_step, trainable_params
from moe_prefix.tools.bench_timing import Arm, machine, paired_ratio, time_interleaved
from moe_prefix.train import generation
from moe_prefix.train.datamodule import EpochSampler
from moe_prefix.train.run_config import load_config

PAIRS = {  # ratio name -> (numerator arm, denominator arm)
    "step: scored logits / every position": ("step_scored_logits", "step_all_logits"),
    "loss pass: longest first / split order": ("loss_pass_longest_first", "loss_pass_split_order"),
    "decoding: longest first / split order": ("decoding_longest_first", "decoding_split_order"),
}


def _training_arms(module: generation.GenerationModule, batches: list[dict]) -> list[Arm]:
    network = module.network
    params = trainable_params(network)

    def all_logits_loss(b):  # what the backbone gives unasked: (b t vocab), then the shifted cross-entropy
        out = network(
            b["input_ids"],
            b["attention_mask"],
            router_input_ids=b["router_input_ids"],
            router_attention_mask=b["router_attention_mask"],
            group_ids=b["group_ids"] if module.oracle else None,  # routed by the source, as model_step routes it
        )
        return F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), b["labels"][:, 1:], ignore_index=-100)

    def scored_logits_loss(b):
        losses, _ = module.model_step(b)
        return losses.mean()

    tokens = sum(b["input_ids"].numel() for b in batches) // len(batches)
    arms = []
    for name, loss in (("step_all_logits", all_logits_loss), ("step_scored_logits", scored_logits_loss)):
        it = itertools.cycle(batches)
        arms.append(Arm(name, train_step(params, lambda loss=loss, it=it: loss(next(it))), tokens, len(params)))
    return arms


def _validation_arms(module: generation.GenerationModule, data: generation.GenerationData) -> list[Arm]:
    def loss_pass(loader):
        def run():
            with torch.no_grad():
                for b in loader:
                    module.forward_pairs(b)

        return run

    def decoding(loader):
        def run():
            for b in loader:
                module.generate_tokens(b["input_ids"], b["attention_mask"])

        return run

    arms = []
    for order, arrange in (("split_order", list), ("longest_first", generation.longest_first)):
        pairs = data.eval_loader(arrange(data.val_pairs))
        prompts = data.generation_loader(arrange(data.val_prompts), data.val_examples)
        arms.append(Arm(f"loss_pass_{order}", loss_pass(pairs), sum(b["input_ids"].numel() for b in pairs)))
        arms.append(Arm(f"decoding_{order}", decoding(prompts), sum(b["input_ids"].numel() for b in prompts)))
    return arms


def run_gem4(
    config: str | None,  # None: the defaults, with `overrides` (the tests)
    overrides: list[str] | tuple[str, ...] = (),
    steps: int = 3,
    val_inputs: int = 32,
    reps: int = 3,
    val_reps: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    """Time the parts of a generation config's run; returns per-arm medians (s), padded tokens and the ratios."""
    cfg = load_config(config, [*overrides, f"data.max_val_examples={val_inputs}"])
    torch.manual_seed(cfg.seed)
    tokenizer, data, network = generation.build(cfg)  # build() loads and tokenises the data
    module = generation.make_module(generation.Built(tokenizer, data, network), cfg)
    order = list(EpochSampler(len(data.train_set), cfg.seed))
    size = cfg.data.batch_size
    batches = [data.collate([data.train_set[i] for i in order[k * size : (k + 1) * size]]) for k in range(steps)]

    log(f"{cfg.model.backbone}: {steps} training batches of {size}, then {val_inputs} validation inputs")
    network.train()
    train_arms = _training_arms(module, batches)
    times = time_interleaved(train_arms, reps, warmup=1)
    network.eval()
    val_arms = _validation_arms(module, data)
    val_times = time_interleaved(val_arms, val_reps, warmup=0)
    for clock in times:
        times[clock] |= val_times[clock]
    arms = {a.name: a for a in (*train_arms, *val_arms)}
    figures = {
        name: {
            "s": statistics.median(ts),
            "cpu_s": statistics.median(times["cpu"][name]),  # this process's CPU time: steadier on a shared machine
            "padded_tokens": arms[name].tokens,
            "times_s": ts,
        }
        for name, ts in times["wall"].items()
    }
    ratios = {label: paired_ratio(times["wall"], a, b) for label, (a, b) in PAIRS.items()}
    cpu_ratios = {label: paired_ratio(times["cpu"], a, b) for label, (a, b) in PAIRS.items()}
    return {
        "machine": machine(),
        "config": config,
        "overrides": list(overrides),
        "steps": steps,
        "val_inputs": val_inputs,
        "val_pairs": len(data.val_pairs),
        "reps": reps,
        "val_reps": val_reps,
        "arms": figures,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
    }


def format_gem4(results: dict) -> str:
    lines = [
        f"{results['config']} {' '.join(results['overrides'])}".rstrip(),
        f"{results['steps']} training batches, {results['val_inputs']} validation inputs "
        f"({results['val_pairs']} reference pairs); medians of {results['reps']} / {results['val_reps']} repetitions",
        f"{'arm':<26} {'s (median)':>11} {'cpu s':>8} {'padded tokens':>14}",
    ]
    for name, f in results["arms"].items():
        lines.append(f"{name:<26} {f['s']:>11.2f} {f['cpu_s']:>8.2f} {f['padded_tokens']:>14,}")
    lines.append("paired ratios (wall clock; process CPU clock in brackets):")
    for label, ratio in results["ratios"].items():
        lines.append(f"  {label:<40} {ratio:.3f}  [{results['cpu_ratios'][label]:.3f}]")
    return "\n".join(lines)
