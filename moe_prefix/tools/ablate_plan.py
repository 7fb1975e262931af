"""What a sweep is: its file, its arms and seeds, and the runs it plans (one folder per arm and seed; `@arm`
references resolved to the run an arm starts from; arms that train nothing planned once)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

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


def chained(sweep: Sweep) -> bool:
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
