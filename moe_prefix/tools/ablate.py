"""Ablation sweeps: arms × seeds through the same `fit`, resumable, summarised with intervals and tests.

Each run is `python -m moe_prefix.tools fit` in its own process (memory is returned after every run, N workers
run side by side, and no source checkout is needed). A run whose directory holds metrics.json is done and
skipped; one with checkpoints is resumed; so a killed sweep restarts where it stopped (a run that failed, on a
full disk say, is listed in the summary with its one-line error, and the next invocation resumes it). The summary
compares every arm with a reference arm on matched seeds (same seed: same initialisation, data order and split): on
the seeds' metrics (a sign-flip test, at most 2**seeds outcomes) and on the validation examples of all
matched seeds together (McNemar's exact test, which can decide with few seeds where the first cannot).

An arm can start from another arm's runs: `model.init_from=@sft` in its overrides becomes the run directory of
arm `sft` with the same seed, and the run waits for that one (SFT, then reinforcement fine-tuning).

An arm that trains nothing (`model.method=none`: the bare backbone, zero- or few-shot) is deterministic: its
demonstrations are drawn with data.split_seed, decoding is greedy and no weight moves, so every seed would repeat
one run. It runs once, with the sweep's first seed, and that run stands for every seed in the comparisons: at the
seed level its value is paired with each reference seed, at the example level its per-example scores with each
reference run's.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from moe_prefix.tools.ablate_plan import (
    GENERATION_SCORES,
    Run,
    Sweep,
    arm_steps,
    load_sweep,
    plan,
    resolve_base,
    sweep_from_grid,
)
from moe_prefix.tools.ablate_summary import example_level_test, seed_test_floor, summarise
from moe_prefix.train import run_dir as rd

# The sweep's definition and its summary live beside this module; the names a user calls come from here.
__all__ = [
    "GENERATION_SCORES",
    "Run",
    "Sweep",
    "arm_steps",
    "example_level_test",
    "fit_argv",
    "load_sweep",
    "plan",
    "resolve_base",
    "run_sweep",
    "summarise",
    "sweep_from_grid",
    "time_left",
]


def fit_argv(run: Run, base: str | Path | None, resume: bool) -> list[str]:
    """The command line of one run: this interpreter's installed package, not a checkout's scripts/."""
    fit = [sys.executable, "-m", "moe_prefix.tools", "fit"]
    if resume:
        return [*fit, "--resume", str(run.run_dir)]
    return [*fit, *(["--config", str(base)] if base else []), *run.overrides]


def _execute(run: Run, base: str | Path | None, log) -> tuple[int, str]:
    """One run in its own process (with the sweep's environment); resumes when an earlier attempt left
    checkpoints. Returns the exit code and, for a failed run, why (its one-line error, else the code)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    resume = rd.has_checkpoints(run.run_dir)
    log(f"{'resume' if resume else 'start'} {run.arm} seed {run.seed}")
    log_file = run.run_dir / "fit.log"
    with open(log_file, "a") as out:
        start = out.tell()
        proc = subprocess.run(fit_argv(run, base, resume), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode == 0:
        log(f"done {run.arm} seed {run.seed}")
        return 0, ""
    why = _error_line(log_file, start) or f"exit code {proc.returncode} (see {log_file})"
    log(f"FAILED ({proc.returncode}) {run.arm} seed {run.seed}: {why}")
    return proc.returncode, why


def time_left(durations: list[float], left: int, workers: int) -> str:
    """A rough ETA for the log: the runs left times the median finished run, spread over the workers. A run
    resumed from checkpoints counts with its shorter time, so early in a resumed sweep the figure runs low."""
    median = statistics.median(durations)
    side = max(1, min(workers, left))
    eta = median * left / side
    when = f"{eta / 60:.0f} min" if eta < 5400 else f"{eta / 3600:.1f} h"
    return f"{left} to go, about {when} at the median run so far ({median:,.0f} s, {side} side by side)"


def _error_line(log_file: Path, start: int) -> str | None:
    """The last `error: ...` line this attempt wrote to the run's log (the command's one-line errors)."""
    with open(log_file, errors="replace") as f:
        f.seek(start)
        lines = [line.strip() for line in f if line.startswith("error: ")]
    return lines[-1] if lines else None


def run_sweep(sweep: Sweep, out_dir: str | Path, workers: int = 1) -> Path:
    """Run what is not done yet, then write the summary; returns the summary Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(sweep, out_dir)
    todo = [r for r in runs if not r.done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to go", flush=True)
    if sweep.reference:  # said before hours of runs: a sweep with too few seeds cannot decide at the seed level
        tested = [arm for arm in sweep.arms if arm != sweep.reference and arm not in sweep.untested]
        print(f"seed-level test: {seed_test_floor(len(sweep.seeds), len(tested))}", flush=True)
    start = time.time()
    counter = itertools.count(1)
    ended, lock = itertools.count(1), threading.Lock()
    durations: list[float] = []  # wall seconds of this invocation's finished runs, for the time-left line

    def log(msg):
        print(
            f"[{next(counter) if msg.startswith(('done', 'FAILED')) else ' '}/{len(todo)}] "
            f"{time.time() - start:6.0f}s {msg}",
            flush=True,
        )

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        # Runs start in plan order, so a run's `@arm` dependency has started (or finished) before it waits.
        futures: dict[tuple[str, int], Future] = {}

        def execute(run: Run) -> tuple[int, str]:
            dependency = futures.get((run.after, run.seed))
            if dependency is not None and dependency.result()[0] != 0:
                log(f"FAILED (skipped: {run.after} seed {run.seed} failed) {run.arm} seed {run.seed}")
                result = -1, f"not started: {run.after} seed {run.seed} failed"
            else:
                began = time.time()
                result = _execute(run, sweep.base, log)
            with lock:
                left = len(todo) - next(ended)
                if result[0] == 0:
                    durations.append(time.time() - began)
                if left and durations:
                    log(time_left(durations, left, workers))
            return result

        for run in todo:
            futures[run.arm, run.seed] = pool.submit(execute, run)
        results = [futures[r.arm, r.seed].result() for r in todo]
    failed = {(r.arm, r.seed): why for r, (code, why) in zip(todo, results, strict=True) if code != 0}
    if failed:
        print(f"{len(failed)} run(s) failed (the next invocation resumes them):", file=sys.stderr)
        for (arm, seed), why in failed.items():
            print(f"  {arm}/seed{seed}: {why}", file=sys.stderr)
    return summarise(sweep, out_dir, failed)
