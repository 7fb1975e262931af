"""Timing and memory of benchmark arms, measured side by side in one process, like this (and why):

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

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

CLOCKS = ("wall", "cpu")


@dataclass
class Arm:
    """One thing to time: fn() runs one unit (a step, a forward, a generate call)."""

    name: str
    fn: Callable[[], object]
    tokens: int  # token positions per call (padding included) or new tokens for generation
    trainable: int = 0  # trainable parameters (0 for no-grad arms)
    info: dict = field(default_factory=dict)


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
