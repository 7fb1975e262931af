"""Publish a sweep: its finished runs' small files and the summary, in a folder meant to be committed.

A sweep folder holds weights, checkpoints and logs (hundreds of MB for a generation study); what a reader needs
to check the summary, rerun its tests or pair a new arm with it is smaller: each run's config, metrics and
per-example table. `publish` copies those of every finished run to `dest/<arm>/seed<k>/` and summarises the
copy there, so the published summary is computed from exactly the files published beside it.

Paths in a run's config that point into the sweep folder (`run_dir`, an `@arm` start) are rewritten to
`runs/<sweep folder name>/...`, the folder the README's commands write to: a published config names no
directory of the machine it ran on, and copying the published folder to `runs/<name>` lets the runner resume
the sweep from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from moe_prefix.tools.ablate_plan import Sweep, plan
from moe_prefix.tools.ablate_summary import summarise
from moe_prefix.train import run_dir as rd
from moe_prefix.train.run_config import ConfigError

# No weights, checkpoints, logs or RL rollouts: the files the summary reads, and the fit's sample generations.
PUBLISHED_FILES = (rd.CONFIG_FILE, rd.METRICS_FILE, rd.ROUTING_FILE, rd.LABELS_FILE, rd.SAMPLES_FILE)


def publish(sweep: Sweep, out_dir: str | Path, dest: str | Path) -> tuple[int, Path]:
    """Copy the finished runs of `sweep` in `out_dir` to `dest` and summarise them there.

    Returns the number of runs copied and the summary's path. Runs already in `dest` that `out_dir` no longer
    holds stay and are summarised too (a sweep folder restored from an earlier publication keeps every run)."""
    out_dir, dest = Path(out_dir), Path(dest)
    if not out_dir.is_dir():
        raise ConfigError(f"no sweep folder {out_dir}: give the --out the sweep ran with")
    if dest.resolve() == out_dir.resolve():
        raise ConfigError(f"--publish {dest} is the sweep folder itself: name another folder")
    finished = [r for r in plan(sweep, out_dir) if r.done]
    if not finished and not any(r.done for r in plan(sweep, dest)):
        raise ConfigError(f"{out_dir} holds no finished run of this sweep (a run is finished once it has metrics.json)")
    for run in finished:
        target = dest / run.run_dir.relative_to(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED_FILES:
            if (run.run_dir / name).is_file():
                shutil.copyfile(run.run_dir / name, target / name)
        if (target / rd.CONFIG_FILE).is_file():
            _point_into_runs(target / rd.CONFIG_FILE, out_dir)
    return len(finished), summarise(sweep, dest)


def _point_into_runs(config: Path, out_dir: Path) -> None:
    """Rewrite the config's paths inside `out_dir` (as given or absolute) to runs/<its name>/..."""
    prefixes = [str(out_dir.resolve()), str(out_dir)]  # the absolute form first: the folder as given is shorter
    runs_root = f"runs/{out_dir.resolve().name}"

    def rewrite(value):
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        if isinstance(value, str):
            for prefix in prefixes:
                if value == prefix or value.startswith(prefix + "/"):
                    return runs_root + value[len(prefix) :]
        return value

    OmegaConf.save(OmegaConf.create(rewrite(OmegaConf.to_container(OmegaConf.load(config)))), config)
