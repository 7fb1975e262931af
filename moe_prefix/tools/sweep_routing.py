"""Routing across a sweep: for every finished run of a routed arm, how its validation inputs were routed.

One row per run, read from its routing.csv and metrics.json: how much weight each input's first choice gets
(near 1: a top-2 blend is in effect top-1), how many experts are anyone's first choice, the dead experts (the
runner's rule), the mean routing entropy, NMI(top-1 expert, group), the expert most of each group's inputs
choose first (which groups share an expert), and the sweep's main metric. Runs without routing weights
(single prefix, LoRA) have nothing to show and are left out.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from moe_prefix.analysis.routing_stats import dead_expert_count, normalized_mutual_info, routing_entropy
from moe_prefix.train import run_dir as rd
from moe_prefix.train.run_config import ConfigError

COLUMNS = ["arm", "seed", "first-choice weight", "experts chosen first", "dead", "entropy", "NMI"]


def _main_metric(sweep_dir: Path) -> str | None:
    """The sweep's main metric: the first metric of its summary.csv (None before it is summarised)."""
    summary = sweep_dir / "summary.csv"
    if not summary.is_file():
        return None
    with open(summary, newline="") as f:
        first = next(csv.DictReader(f), None)
    return first["metric"] if first else None


def sweep_routing(
    sweep_dir: str | Path, arms: list[str] | None = None, metric: str | None = None
) -> tuple[list[dict], list[str]]:
    """Rows (one per routed run, COLUMNS + "top-1 by group" + the metric) and the group names, sorted, that
    "top-1 by group" lists its experts for. metric: a key of metrics.json (default: the sweep's main metric)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep folder not found: {sweep_dir}")
    metric = metric or _main_metric(sweep_dir)
    run_dirs = sorted(
        (d for d in sweep_dir.glob("*/seed*") if re.fullmatch(r"seed\d+", d.name)),
        key=lambda d: (d.parent.name, int(d.name.removeprefix("seed"))),
    )
    known = sorted({d.parent.name for d in run_dirs})
    unknown = sorted(set(arms or []) - set(known))
    if unknown:
        raise ConfigError(f"{sweep_dir} has no arm {', '.join(unknown)}; its arms: {', '.join(known) or 'none'}")
    rows, groups = [], set()
    for run_dir in run_dirs:
        arm = run_dir.parent.name
        if arms and arm not in arms or not (run_dir / rd.METRICS_FILE).is_file():
            continue  # another arm, or not finished
        table = rd.read_routing_table(run_dir)
        if not table.routed:
            continue
        w = table.weights
        top1 = w.argmax(1)
        named = table.groups != ""
        by_group = {
            str(g): int(np.bincount(top1[table.groups == g], minlength=w.shape[1]).argmax())
            for g in np.unique(table.groups[named])
        }
        groups |= set(by_group)
        value = rd.read_metrics(run_dir).get(metric, np.nan) if metric else np.nan
        rows.append(
            {
                "arm": arm,
                "seed": int(run_dir.name.removeprefix("seed")),
                "first-choice weight": float((w.max(1) / w.sum(1)).mean()),
                "experts chosen first": len(np.unique(top1)),
                "dead": dead_expert_count(w.mean(0)),
                "entropy": routing_entropy(w).mean_entropy,
                "NMI": normalized_mutual_info(top1[named], table.groups[named]) if named.any() else np.nan,
                "top-1 by group": by_group,
                metric or "metric": value,
            }
        )
    if not rows:
        raise ConfigError(
            f"{sweep_dir} has no finished run with routing weights{' in ' + ', '.join(arms) if arms else ''}"
        )
    return rows, sorted(groups)


def routing_markdown(rows: list[dict], groups: list[str]) -> str:
    """The rows as a Markdown table; "top-1 by group" lists e<i> in the order of `groups` (named under it)."""
    metric = list(rows[0])[-1]
    header = [*COLUMNS, "top-1 by group", metric]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["arm"], str(r["seed"]), f"{r['first-choice weight']:.3f}", str(r["experts chosen first"])]
        cells += [str(r["dead"]), f"{r['entropy']:.3f}", "–" if np.isnan(r["NMI"]) else f"{r['NMI']:.3f}"]
        cells += [" ".join(f"e{r['top-1 by group'][g]}" if g in r["top-1 by group"] else "–" for g in groups)]
        cells += ["–" if np.isnan(r[metric]) else f"{r[metric]:#.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if groups:
        lines += [
            "",
            "top-1 by group: the expert most inputs of each group choose first, groups in the order "
            + ", ".join(groups)
            + ".",
        ]
    return "\n".join(lines) + "\n"
