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

import csv
import itertools
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from moe_prefix.analysis.stats import (
    McNemarResult,
    bootstrap_ci,
    cohens_d_paired,
    holm,
    mcnemar_test,
    paired_permutation_test,
)
from moe_prefix.train import run_dir as rd
from moe_prefix.train.run_config import ConfigError, load_config

# per-example columns of a generation run's routing.csv that a paired test can use (generation.EXAMPLE_SCORES
# less `slots`, a count); lower is better for ser
GENERATION_SCORES = ("bleu", "rougeL", "ser", "coverage")


@dataclass
class Sweep:
    base: str | Path | None  # base config file (load_sweep and sweep_from_grid make it absolute)
    arms: dict[str, list[str]]  # arm name -> config overrides
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)  # applied to every arm (the budget)
    reference: str | None = None  # arm the others are tested against
    metric: str = "val/acc"
    curve: dict[str, str] | None = None  # {x: config key, series: config key}: also plot the metric against x
    also: list[str] = field(default_factory=list)  # further metrics, each summarised in a table of its own
    untested: list[str] = field(default_factory=list)  # arms summarised but kept out of the tests and their Holm
    # family: stages other arms start from (model.init_from=@arm), or references such as LoRA
    example_score: str = "bleu"  # generation: the routing.csv column paired across runs (sentence BLEU)
    once: list[str] = field(default_factory=list)  # arms run once, with the first seed, standing for every seed:
    # load_sweep and sweep_from_grid list there the arms that train nothing (model.method=none), which are deterministic

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *self.also]


def load_sweep(path: str | Path) -> Sweep:
    """A sweep file: base, overrides, seeds, reference, metric, also, curve, example_score, arms {name: [...]}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    keys = {"base", "arms", "seeds", "overrides", "reference", "metric", "also", "curve", "untested", "example_score"}
    unknown = set(raw) - keys
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; valid: {', '.join(sorted(keys))}")
    example_score = raw.get("example_score", "bleu")
    if example_score not in GENERATION_SCORES:
        raise ConfigError(f"{path}: example_score={example_score!r} is not one of {', '.join(GENERATION_SCORES)}")
    also = raw.get("also", [])
    if not isinstance(also, list) or not all(isinstance(m, str) for m in also):
        raise ConfigError(f"{path}: also must be a list of metric names such as [val/bleu, val/rougeL], got {also!r}")
    curve = raw.get("curve")
    if curve is not None and (not isinstance(curve, dict) or "x" not in curve or set(curve) - {"x", "series"}):
        raise ConfigError(f"{path}: curve must be {{x: config key, series: config key (optional)}}, got {curve!r}")
    if not raw.get("arms"):
        raise ConfigError(f"{path}: a sweep needs 'arms' (name: [key=value, ...])")
    arms = {str(name): [str(o) for o in (ovs or [])] for name, ovs in raw["arms"].items()}
    sweep = Sweep(
        resolve_base(raw.get("base"), sweep_file=path),
        arms,
        list(raw.get("seeds", [0, 1, 2])),
        list(raw.get("overrides", [])),
        raw.get("reference"),
        raw.get("metric", "val/acc"),
        curve,
        also,
        [str(arm) for arm in raw.get("untested", [])],
        example_score,
    )
    return _check(sweep)


def sweep_from_grid(base: str | None, grid: list[str], seeds: list[int], overrides: list[str]) -> Sweep:
    """`--sweep prefix.top_k=1,2 prefix.combine=blend,concat`: the product of the listed values."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--sweep {item!r} must look like key=v1,v2")
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    arms = {" ".join(combo): list(combo) for combo in itertools.product(*axes)}
    return _check(Sweep(resolve_base(base), arms, seeds, overrides, next(iter(arms))))


def resolve_base(base: str | None, sweep_file: Path | None = None) -> Path | None:
    """The base config as an absolute path: relative to the current directory, else (for a sweep file's
    `base:`) to the sweep file's folder and each folder above it, so that `base: configs/moe4.yaml` in
    configs/ablations/x.yaml works from the repository root and from anywhere else."""
    if base is None:
        return None
    path = Path(base)
    candidates = [path]
    if sweep_file is not None and not path.is_absolute():
        folder = sweep_file.resolve().parent
        candidates += [d / path for d in (folder, *folder.parents)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    where = f"relative to {Path.cwd()}"
    if len(candidates) > 1:
        where += f", to {sweep_file.parent} or to a folder above it"
    raise ConfigError(f"base config not found: {base} (looked {where})")


def _arm_reference(override: str) -> str | None:
    """The arm named by `key=@arm` (that arm's run with the same seed), else None."""
    value = override.split("=", 1)[1] if "=" in override else ""
    return value[1:] if value.startswith("@") else None


def _run_folder(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / _slug(arm) / f"seed{seed}"


def _resolve_arm_reference(override: str, out_dir: Path, seed: int) -> str:
    """`key=@arm` -> `key=<that arm's run directory for this seed>`; other overrides unchanged."""
    target = _arm_reference(override)
    return override if target is None else f"{override.split('=', 1)[0]}={_run_folder(out_dir, target, seed)}"


def _check(sweep: Sweep) -> Sweep:
    """Every arm must make a valid config before the first run starts."""
    if sweep.reference is not None and sweep.reference not in sweep.arms:
        raise ConfigError(f"reference arm {sweep.reference!r} is not one of the arms: {', '.join(sweep.arms)}")
    for arm in sweep.untested:
        if arm not in sweep.arms or arm == sweep.reference:
            raise ConfigError(
                f"untested arm {arm!r} must be one of the arms other than the reference: {', '.join(sweep.arms)}"
            )
    untrained = []
    for name, ovs in sweep.arms.items():
        earlier = list(sweep.arms)[: list(sweep.arms).index(name)]
        for target in filter(None, map(_arm_reference, ovs)):
            if target not in earlier:
                raise ConfigError(
                    f"arm {name!r}: @{target} must name an arm listed before it (runs start in file order); "
                    f"arms before it: {', '.join(earlier) or 'none'}"
                )
        try:  # `@arm` stands for a run directory, which exists only once the sweep runs
            cfg = load_config(sweep.base, [*sweep.overrides, *(_resolve_arm_reference(o, Path("out"), 0) for o in ovs)])
        except ConfigError as err:
            raise ConfigError(f"arm {name!r}: {err}") from None
        if cfg.model.method == "none":
            untrained.append(name)
    sweep.once = [arm for arm in sweep.arms if arm in untrained or arm in sweep.once]
    for name, ovs in sweep.arms.items():
        for target in filter(None, map(_arm_reference, ovs)):
            if target in sweep.once:
                raise ConfigError(f"arm {name!r}: @{target} trains nothing and runs once: no run to start from")
    return sweep


def arm_steps(sweep: Sweep) -> dict[str, int | None]:
    """Optimizer steps each arm trains, counting the runs it starts from (`model.init_from=@arm`), from
    trainer.max_steps; None where the arm, or a run it starts from, is bounded by epochs instead.

    A chained arm (a one-expert prefix, then the mixture upcycled from it) is compared fairly only when this
    total equals the other arms' budget."""
    steps: dict[str, int | None] = {}
    for name, ovs in sweep.arms.items():
        cfg = load_config(sweep.base, [*sweep.overrides, *(_resolve_arm_reference(o, Path("out"), 0) for o in ovs)])
        max_steps = 0 if cfg.model.method == "none" else int(cfg.trainer.get("max_steps", -1))
        total = max_steps if max_steps >= 0 else None
        for target in (_arm_reference(o) for o in ovs if o.startswith("model.init_from=")):
            total = None if total is None or steps[target] is None else total + steps[target]
        steps[name] = total
    return steps


def _chained(sweep: Sweep) -> bool:
    return any(o.startswith("model.init_from=@") for ovs in sweep.arms.values() for o in ovs)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


@dataclass
class Run:
    arm: str
    seed: int
    run_dir: Path
    overrides: list[str]
    after: str | None = None  # the arm whose run with this seed must finish first (an `@arm` override)

    @property
    def done(self) -> bool:
        return (self.run_dir / rd.METRICS_FILE).is_file()


def plan(sweep: Sweep, out_dir: Path) -> list[Run]:
    """Every (arm, seed) run, seed by seed: a sweep stopped part-way has compared all arms on its first seeds.
    An arm of `sweep.once` has one run, with the first seed.

    The sweep's name, which trackers use as W&B group and MLflow experiment, is its output folder's name."""
    return [
        Run(
            arm,
            seed,
            _run_folder(out_dir, arm, seed),
            [
                # Trackers (trainer.loggers) file the sweep's runs together; a group set in the sweep wins.
                f"tracking.group={out_dir.resolve().name}",
                f"tracking.tags.arm={arm}",
                f"tracking.tags.seed={seed}",
                *sweep.overrides,
                *(_resolve_arm_reference(o, out_dir, seed) for o in ovs),
                f"seed={seed}",
                f"run_dir={_run_folder(out_dir, arm, seed)}",
                f"name={_slug(arm)}",
                "trainer.enable_progress_bar=false",
            ],
            next(filter(None, map(_arm_reference, ovs)), None),
        )
        for seed in sweep.seeds
        for arm, ovs in sweep.arms.items()
        if arm not in sweep.once or seed == sweep.seeds[0]
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
    start = time.time()
    counter = itertools.count(1)

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
                return -1, f"not started: {run.after} seed {run.seed} failed"
            return _execute(run, sweep.base, log)

        for run in todo:
            futures[run.arm, run.seed] = pool.submit(execute, run)
        results = [futures[r.arm, r.seed].result() for r in todo]
    failed = {(r.arm, r.seed): why for r, (code, why) in zip(todo, results, strict=True) if code != 0}
    if failed:
        print(f"{len(failed)} run(s) failed (the next invocation resumes them):", file=sys.stderr)
        for (arm, seed), why in failed.items():
            print(f"  {arm}/seed{seed}: {why}", file=sys.stderr)
    return summarise(sweep, out_dir, failed)


def _correct_by_id(run_dir: Path) -> dict[str, bool] | None:
    """Validation example id -> whether the run predicted it right; None without routing.csv or labels."""
    if not (run_dir / rd.ROUTING_FILE).is_file():
        return None
    table = rd.read_routing_table(run_dir)
    if table.labels is None:  # generation: no label to be right about
        return None
    return dict(zip(table.ids.tolist(), (table.labels == table.predictions).tolist(), strict=True))


def _scores_by_id(run_dir: Path, column: str) -> dict[str, float] | None:
    """Validation example id -> its score in routing.csv's `column` (generation runs); None without the column.
    Examples where the score is undefined (SER of a non-E2E input) are left out."""
    path = run_dir / rd.ROUTING_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0] or "label" in rows[0]:
        return None
    return {r["id"]: float(r[column]) for r in rows if r[column] != ""}


def example_level_test(pairs: list[tuple[Path, Path]], score: str = "bleu") -> tuple[int, McNemarResult | None]:
    """An example-level paired test over (seed, example) pairs pooled across matched seeds.

    `pairs`: (arm run, reference run) directories, one per matched seed. Within a seed both runs were scored
    on the same validation split, so their routing.csv rows join on the example id. Classification: McNemar's
    exact test on right / wrong. Generation: the sign-flip permutation test on the per-example differences of
    routing.csv's `score` column (sentence BLEU by default); only_a / only_b then count the pairs where the arm
    scores higher / lower (for ser: lower / higher, fewer errors being better). Returns the number of pairs
    and the test; (0, None) when no seed has per-example results on both sides.
    """
    arm_right: list[bool] = []
    ref_right: list[bool] = []
    arm_score: list[float] = []
    ref_score: list[float] = []
    for arm_dir, ref_dir in pairs:
        arm, ref = _correct_by_id(arm_dir), _correct_by_id(ref_dir)
        if arm is not None and ref is not None:
            common = [i for i in arm if i in ref]
            arm_right += [arm[i] for i in common]
            ref_right += [ref[i] for i in common]
            continue
        arm_s, ref_s = _scores_by_id(arm_dir, score), _scores_by_id(ref_dir, score)
        if arm_s is not None and ref_s is not None:
            common = [i for i in arm_s if i in ref_s]
            arm_score += [arm_s[i] for i in common]
            ref_score += [ref_s[i] for i in common]
    if arm_right:
        return len(arm_right), mcnemar_test(arm_right, ref_right)
    if not arm_score:
        return 0, None
    a, b = np.array(arm_score), np.array(ref_score)
    sign = -1 if score == "ser" else 1  # "better" is fewer slot errors
    better, worse = int((sign * (a - b) > 0).sum()), int((sign * (a - b) < 0).sum())
    return len(a), McNemarResult(better, worse, paired_permutation_test(a, b, seed=0))


def summarise(sweep: Sweep, out_dir: Path, failed: dict[tuple[str, int], str] | None = None) -> Path:
    """runs.csv (one row per run), summary.csv/.md (one row per arm and metric) and summary.png (the first).

    failed: (arm, seed) -> why, for runs of this invocation that failed; summary.md lists them.
    """
    runs = [r for r in plan(sweep, out_dir) if r.done]
    rows = []
    for r in runs:
        m = rd.read_metrics(r.run_dir)
        rows.append(
            {
                "arm": r.arm,
                "seed": r.seed,
                "metric": m.get(sweep.metric, float("nan")),
                "trainable_params": m.get("trainable_params"),
                "train_time_s": m.get("train_time_s"),
                **{name: m.get(name, float("nan")) for name in sweep.also},
            }
        )
    with open(out_dir / "runs.csv", "w", newline="") as f:
        fields = ["arm", "seed", "metric", "trainable_params", "train_time_s", *sweep.also]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    run_dirs = {(r.arm, r.seed): r.run_dir for r in runs}
    tables = {  # a run without the metric (LoRA has no routing NMI) is left out of that metric's table
        name: _compare_arms(
            sweep,
            [{**row, "metric": row[column]} for row in rows if not _missing(row[column])],
            run_dirs,
            example_level=name == sweep.metric,
        )
        for name, column in zip(sweep.metrics, ["metric", *sweep.also], strict=True)
    }
    _write_summary(sweep, out_dir, tables, failed or {})
    _plot(sweep, out_dir, tables[sweep.metric], rows)
    if sweep.curve:
        points = _curve(sweep, out_dir, tables[sweep.metric])
        _curve_contrasts(sweep, out_dir, points, rows, run_dirs)
    return out_dir / "summary.md"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _compare_arms(
    sweep: Sweep, rows: list[dict], run_dirs: dict[tuple[str, int], Path], example_level: bool = True
) -> list[dict]:
    """One entry per arm with runs: mean and interval of rows' `metric`, and the paired tests against the
    reference arm: on the seeds' metric, and (example_level) McNemar's on the correctness of each validation
    example in routing.csv, which belongs with the sweep's main metric only."""
    by_arm = {arm: {row["seed"]: row for row in rows if row["arm"] == arm} for arm in sweep.arms}
    ref = _every_seed(sweep, sweep.reference or "", by_arm.get(sweep.reference or "", {}))
    summary = []
    for arm, seeds in by_arm.items():
        if not seeds:
            continue
        runs = seeds  # the runs themselves (an arm of sweep.once has one), for the mean and the interval
        seeds = _every_seed(sweep, arm, seeds)
        values = np.array([s["metric"] for s in runs.values()])
        times = [np.nan if _missing(s["train_time_s"]) else s["train_time_s"] for s in runs.values()]  # 0: untrained
        est, low, high = bootstrap_ci(values, seed=0) if len(values) > 1 else (values[0], np.nan, np.nan)
        entry = {
            "arm": arm,
            "n": len(values),
            "mean": est,
            "ci_low": low,
            "ci_high": high,
            "trainable_params": int(np.median([s["trainable_params"] or 0 for s in runs.values()])),
            "train_time_s": float(np.median(times)),
            "diff": np.nan,
            "diff_ci_low": np.nan,
            "diff_ci_high": np.nan,
            "p": np.nan,
            "p_holm": np.nan,
            "d": np.nan,
            "pairs": 0,
            "only_arm": np.nan,
            "only_ref": np.nan,
            "p_example": np.nan,
            "p_example_holm": np.nan,
        }
        matched = sorted(set(seeds) & set(ref)) if arm not in sweep.untested else []
        if example_level and arm != sweep.reference and matched:
            pairs = [(run_dirs[arm, seeds[s]["seed"]], run_dirs[sweep.reference, ref[s]["seed"]]) for s in matched]
            entry["pairs"], test = example_level_test(pairs, sweep.example_score)
            if test is not None:
                entry.update(only_arm=test.only_a, only_ref=test.only_b, p_example=test.pvalue)
        if arm != sweep.reference and len(matched) >= 2:
            a = np.array([seeds[s]["metric"] for s in matched])
            b = np.array([ref[s]["metric"] for s in matched])
            entry["diff"] = float((a - b).mean())
            _, entry["diff_ci_low"], entry["diff_ci_high"] = bootstrap_ci(a - b, seed=0)
            entry["p"] = paired_permutation_test(a, b, seed=0)
            entry["d"] = cohens_d_paired(a, b) if np.std(a - b) > 0 else np.nan
        summary.append(entry)
    _holm_columns(summary)
    return summary


def _every_seed(sweep: Sweep, arm: str, runs: dict[int, dict]) -> dict[int, dict]:
    """An arm's rows by seed; the one run of an arm of sweep.once (deterministic) stands for every seed."""
    if arm in sweep.once and runs:
        return dict.fromkeys(sweep.seeds, next(iter(runs.values())))
    return runs


def _holm_columns(entries: list[dict]) -> None:
    """p_holm and p_example_holm: Holm's correction over the entries that have a p (resp. p_example); the
    tests never return NaN, so NaN marks an entry that was not tested (the reference, or too few seeds)."""
    for key, holm_key in (("p", "p_holm"), ("p_example", "p_example_holm")):
        tested = [e for e in entries if not np.isnan(e[key])]
        if tested:
            for e, q in zip(tested, holm([e[key] for e in tested]), strict=True):
                e[holm_key] = float(q)


def _test_cells(e: dict) -> str:
    """The table cells of one entry's paired tests against its reference, from Δ to p (McNemar, Holm)."""
    discordant = f"{e['only_arm']} / {e['only_ref']}" if e["pairs"] else "–"
    return (
        f"{_fmt(e['diff'], '+.4f')} | [{_fmt(e['diff_ci_low'], '+.4f')}, {_fmt(e['diff_ci_high'], '+.4f')}] "
        f"| {_fmt(e['p'], '.3f')} | {_fmt(e['p_holm'], '.3f')} | {_fmt(e['d'], '.2f')} "
        f"| {e['pairs'] or '–'} | {discordant} | {_fmt(e['p_example'], '.2g')} | {_fmt(e['p_example_holm'], '.2g')}"
    )


def _fmt(x, spec=".4f"):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _write_summary(
    sweep: Sweep, out_dir: Path, tables: dict[str, list[dict]], failed: dict[tuple[str, int], str]
) -> None:
    keys = ["arm", "n", "mean", "ci_low", "ci_high", "diff", "p", "p_holm", "d", "trainable_params", "train_time_s"]
    keys += ["pairs", "only_arm", "only_ref", "p_example", "p_example_holm", "metric"]  # appended: old columns stay
    keys += ["diff_ci_low", "diff_ci_high"]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({**e, "metric": name} for name, summary in tables.items() for e in summary)
    ref = sweep.reference or "–"
    lines = []
    for name, summary in tables.items():
        if len(tables) > 1:
            lines += [f"### {name}", ""]
        lines += [
            f"| arm | seeds | {name} mean | 95 % bootstrap CI | Δ vs {ref} | Δ 95 % CI | p (paired perm.) | p (Holm) "
            "| Cohen's d (paired) | example pairs | only arm / only ref right | p (McNemar) | p (McNemar, Holm) "
            "| trainable params | train time (s, median) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in summary:
            lines.append(
                f"| {e['arm']} | {e['n']} | {_fmt(e['mean'])} | [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] "
                f"| {_test_cells(e)} | {e['trainable_params']:,} | {_fmt(e['train_time_s'], '.0f')} |"
            )
        lines.append("")
    lines += [
        f"Reference arm: {ref}. p: two-sided paired sign-flip permutation test on matched seeds (exact "
        "enumeration for few seeds; with 3 seeds the smallest attainable p is 0.25), Holm-corrected across arms. "
        "CI: percentile bootstrap over seeds (with 3 seeds it spans the observed range at best); Δ CI: the same "
        "over the matched seeds' differences. "
        "p (McNemar): exact two-sided McNemar test (binomial test on the discordant pairs) over the (seed, "
        "validation example) pairs of all matched seeds, Holm-corrected across arms; only arm / only ref: pairs "
        "that one of the two gets right and the other wrong. It treats examples as independent given the "
        "seeds, so it answers for this validation set, not for a new draw of training seeds.",
    ]
    if any(e["pairs"] for summary in tables.values() for e in summary) and _is_generation(sweep):
        lines += [
            "",
            f"Generation runs have no right or wrong: their example-level columns are the two-sided sign-flip "
            f"permutation test on the per-example differences of `{sweep.example_score}` (routing.csv; `bleu` is "
            "sentence BLEU) over the same pooled (seed, example) pairs, Holm-corrected across arms; only arm / "
            "only ref count the pairs where the arm scores better / worse.",
        ]
    if sweep.untested:
        lines += ["", f"Not tested (outside the Holm family): {', '.join(sweep.untested)}."]
    once = [arm for arm in sweep.once if any(e["arm"] == arm for summary in tables.values() for e in summary)]
    if once:
        lines += [
            "",
            f"One run each (seeds 1; they train nothing, so every seed would repeat it): {', '.join(once)}. That run "
            f"stands for every seed in the tests against {ref}: its value is paired with each seed's, its per-example "
            "scores with each run's; it has no interval.",
        ]
    if _chained(sweep):
        budget = ", ".join(f"{arm} {'epochs' if n is None else n}" for arm, n in arm_steps(sweep).items())
        lines += ["", f"Training steps per arm, counting the runs an arm starts from (model.init_from=@arm): {budget}."]
    if failed:
        lines += ["", "### Runs that failed", "", "| arm | seed | why |", "|---|---|---|"]
        lines += [f"| {arm} | {seed} | {why.replace('|', '/')} |" for (arm, seed), why in failed.items()]
        lines += ["", "They are left out of the tables above; the next invocation of this sweep resumes them."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _is_generation(sweep: Sweep) -> bool:
    try:
        return load_config(sweep.base, sweep.overrides).model.task == "generation"
    except ConfigError:
        return False


def _plot(sweep: Sweep, out_dir: Path, summary: list[dict], rows: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.5 * len(summary) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, e in enumerate(summary):
        seeds = [r["metric"] for r in rows if r["arm"] == e["arm"]]
        ax.scatter(seeds, [i] * len(seeds), color="0.6", s=12, zorder=2)
        if not np.isnan(e["ci_low"]):
            ax.plot([e["ci_low"], e["ci_high"]], [i, i], color="C0", lw=3, zorder=1)
        ax.scatter([e["mean"]], [i], color="C0" if e["arm"] != sweep.reference else "C3", s=40, zorder=3)
    ax.set_yticks(range(len(summary)), [e["arm"] for e in summary])
    ax.invert_yaxis()
    ax.set_xlabel(f"{sweep.metric} (dots: seeds; bar: 95 % bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "summary.png", dpi=120)


def _config_value(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _curve(sweep: Sweep, out_dir: Path, summary: list[dict]) -> list[dict]:
    """curve.csv and curve.png: each arm's mean and interval against the config value `curve.x`, one line per
    value of `curve.series` (e.g. accuracy against training-set size, with and without reparameterisation).
    Returns the points (series, x, arm, ...), ordered by series and x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_key, series_key = sweep.curve["x"], sweep.curve.get("series")
    points = []
    for e in summary:
        cfg = load_config(sweep.base, [*sweep.overrides, *sweep.arms[e["arm"]]])
        series = str(_config_value(cfg, series_key)) if series_key else "all"
        points.append({"series": series, "x": _config_value(cfg, x_key), **{k: e[k] for k in ("arm", "n", "mean")}})
        points[-1].update(ci_low=e["ci_low"], ci_high=e["ci_high"])
    points.sort(key=lambda p: (p["series"], p["x"]))
    with open(out_dir / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["series", "x", "arm", "n", "mean", "ci_low", "ci_high"])
        writer.writeheader()
        writer.writerows(points)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, series in enumerate(dict.fromkeys(p["series"] for p in points)):
        line = [p for p in points if p["series"] == series]
        xs = [p["x"] for p in line]
        ax.plot(xs, [p["mean"] for p in line], marker="o", color=f"C{i}", label=f"{series_key or ''}={series}")
        ax.fill_between(xs, [p["ci_low"] for p in line], [p["ci_high"] for p in line], color=f"C{i}", alpha=0.2)
    if all(isinstance(p["x"], int | float) and p["x"] > 0 for p in points):
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis's minor labels (3x10^2, ...) would overprint the tick labels set below
        ax.set_xticks(sorted({p["x"] for p in points}), [str(x) for x in sorted({p["x"] for p in points})])
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{sweep.metric} (mean over seeds, 95 % bootstrap CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=120)
    return points


def _curve_contrasts(
    sweep: Sweep, out_dir: Path, points: list[dict], rows: list[dict], run_dirs: dict[tuple[str, int], Path]
) -> None:
    """curve_contrasts.csv/.md: at each x, every further series against the first (in sorted order: reparam
    True against False) on matched seeds, with the summary's paired tests; Holm-corrected across all the
    contrasts, since the question a curve asks (does one series win, and where) is asked at every x."""
    series = list(dict.fromkeys(p["series"] for p in points))
    arm_at = {(p["series"], p["x"]): p["arm"] for p in points}
    contrasts = []
    for name in series[1:]:
        for p in (p for p in points if p["series"] == name and (series[0], p["x"]) in arm_at):
            base = arm_at[series[0], p["x"]]
            pair = replace(sweep, arms={base: [], p["arm"]: []}, reference=base)
            entry = _compare_arms(pair, [r for r in rows if r["arm"] in (base, p["arm"])], run_dirs)[-1]
            if entry["arm"] == p["arm"] and not np.isnan(entry["p"]):
                base_mean = next(q["mean"] for q in points if q["arm"] == base)
                contrasts.append({"x": p["x"], "series": name, "versus": series[0], "base_mean": base_mean, **entry})
    if not contrasts:
        return
    _holm_columns(contrasts)  # across the x values: the curve asks its question at every one
    keys = ["x", "series", "versus", "n", "base_mean", "mean", "diff", "p", "p_holm", "d", "pairs"]
    keys += ["only_arm", "only_ref", "p_example", "p_example_holm", "diff_ci_low", "diff_ci_high"]
    with open(out_dir / "curve_contrasts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(contrasts)
    x_key, series_key = sweep.curve["x"], sweep.curve.get("series")
    lines = [
        f"| {x_key} | {series_key} | seeds | {sweep.metric} (versus) | {sweep.metric} | Δ | Δ 95 % CI "
        "| p (paired perm.) | p (Holm) | Cohen's d (paired) | example pairs | only it / only versus right "
        "| p (McNemar) | p (McNemar, Holm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contrasts:
        lines.append(
            f"| {c['x']} | {c['series']} vs {c['versus']} | {c['n']} | {_fmt(c['base_mean'])} | {_fmt(c['mean'])} "
            f"| {_test_cells(c)} |"
        )
    lines += [
        "",
        f"At each {x_key}, each {series_key} against {series[0]} on matched seeds: the summary's tests, "
        "Holm-corrected across every row of this table.",
    ]
    (out_dir / "curve_contrasts.md").write_text("\n".join(lines) + "\n")
