"""A sweep's summary: runs.csv, per-arm tables with intervals and paired tests against the reference arm (seed
level and example level, Holm-corrected), summary.png, and for curve sweeps the curve and its contrasts."""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from moe_prefix.analysis.stats import (
    McNemarResult,
    bootstrap_ci,
    cohens_d_paired,
    holm,
    mcnemar_test,
    paired_permutation_test,
    smallest_sign_flip_p,
)
from moe_prefix.tools.ablate_plan import Sweep, arm_steps, chained, plan
from moe_prefix.train import run_dir as rd
from moe_prefix.train.run_config import ConfigError, load_config


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
            "seeds_matched": 0,  # seeds paired with the reference in the seed-level test
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
            entry["seeds_matched"] = len(matched)
            entry["d"] = cohens_d_paired(a, b) if np.std(a - b) > 0 else np.nan
        summary.append(entry)
    _holm_columns(summary)
    return summary


def seed_test_floor(seeds: int, family: int, alpha: float = 0.05) -> str:
    """What the seed-level test can show at best: the smallest p with `seeds` matched seeds, after Holm over
    `family` tested arms, and, where that is not below alpha, how many seeds would let it be."""
    if seeds < 1 or family < 1:
        return "no seed-level test (no arm has matched seeds with the reference)"
    p = smallest_sign_flip_p(seeds)
    text = f"with {seeds} seed{'s' if seeds > 1 else ''} the smallest attainable p is {p:.3g}, "
    text += f"{min(1.0, family * p):.3g} after Holm over "
    text += f"{family} arm{'s' if family > 1 else ''}"
    if family * p >= alpha:
        needed = next(n for n in itertools.count(seeds + 1) if family * smallest_sign_flip_p(n) < alpha)
        text += f": no arm can reach p < {alpha:g} at the seed level, whatever the runs show ({needed} seeds can)"
    return text


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
    keys += ["diff_ci_low", "diff_ci_high", "seeds_matched"]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({**e, "metric": name} for name, summary in tables.items() for e in summary)
    ref = sweep.reference or "–"
    # Generation has no right or wrong: its example-level test is a sign-flip test on per-example scores.
    generation = _is_generation(sweep)
    discordant, example_p = (
        ("arm / ref better", "p (examples)") if generation else ("only arm / only ref right", "p (McNemar)")
    )
    lines = []
    for name, summary in tables.items():
        if len(tables) > 1:
            lines += [f"### {name}", ""]
        lines += [
            f"| arm | seeds | {name} mean | 95 % bootstrap CI | Δ vs {ref} | Δ 95 % CI | p (paired perm.) | p (Holm) "
            f"| Cohen's d (paired) | example pairs | {discordant} | {example_p} | {example_p[:-1]}, Holm) "
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
        f"enumeration for few seeds; {_floor_of(tables[sweep.metric])}), Holm-corrected across arms. "
        "CI: percentile bootstrap over seeds (it never reaches past the seeds' own range, so with few seeds it is "
        "too narrow); Δ CI: the same "
        "over the matched seeds' differences. "
        + (
            f"p (examples): two-sided sign-flip permutation test on the per-example differences of "
            f"`{sweep.example_score}` (routing.csv; `bleu` is sentence BLEU) over the (seed, validation example) "
            "pairs of all matched seeds, Holm-corrected across arms; arm / ref better: pairs where the arm scores "
            "better / worse (generation has no right or wrong)."
            if generation
            else "p (McNemar): exact two-sided McNemar test (binomial test on the discordant pairs) over the (seed, "
            "validation example) pairs of all matched seeds, Holm-corrected across arms; only arm / only ref: pairs "
            "that one of the two gets right and the other wrong."
        )
        + " It treats examples as independent given the seeds, so it answers for this validation set, not for a "
        "new draw of training seeds.",
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
    if chained(sweep):
        budget = ", ".join(f"{arm} {'epochs' if n is None else n}" for arm, n in arm_steps(sweep).items())
        lines += ["", f"Training steps per arm, counting the runs an arm starts from (model.init_from=@arm): {budget}."]
    if failed:
        lines += ["", "### Runs that failed", "", "| arm | seed | why |", "|---|---|---|"]
        lines += [f"| {arm} | {seed} | {why.replace('|', '/')} |" for (arm, seed), why in failed.items()]
        lines += ["", "They are left out of the tables above; the next invocation of this sweep resumes them."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _floor_of(summary: list[dict]) -> str:
    """seed_test_floor for a table: the most matched seeds any tested arm has, the tested arms as the family."""
    tested = [e for e in summary if not np.isnan(e["p"])]
    return seed_test_floor(max((e["seeds_matched"] for e in tested), default=0), len(tested))


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


def read_summary_csv(path: Path, metric: str | None = None) -> dict[str, dict[str, float]]:
    """A summary.csv's rows of `metric` (default: its main metric, the first row's), by arm in file order,
    every other column as a float (nan where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    name = metric or (rows[0]["metric"] if rows else "?")
    rows = [r for r in rows if r["metric"] == name]
    if not rows:
        raise ConfigError(f"{path} has no rows of metric {name}")
    return {
        r["arm"]: {k: float(v) if v not in (None, "") else np.nan for k, v in r.items() if k not in ("arm", "metric")}
        for r in rows
    }


def compare_studies(folders: list[Path], metric: str | None = None, scale: float = 100.0) -> str:
    """One Markdown table of the tested arms of several summarised sweeps, read from their summary.csv,
    summary.md and runs.csv: per study and arm, the seeds, the mean, Δ against the study's reference with its
    95 % interval (both times `scale`, e.g. accuracy points), the Holm-corrected seed- and example-level p, and
    the most dead experts any seed ended with (where runs.csv has val/dead_experts).

    metric: a metric of the summaries (default: each sweep's main metric, the first in its summary.csv).
    """
    lines = [
        f"| study | arm | seeds | mean (×{scale:g}) | Δ vs reference [95 % CI] | p (Holm) | p (examples, Holm) "
        "| dead experts (max over seeds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder in map(Path, folders):
        summary_csv, summary_md = folder / "summary.csv", folder / "summary.md"
        if not summary_csv.is_file() or not summary_md.is_file():
            raise ConfigError(f"{folder} has no summary.csv and summary.md: summarise it first (moe-prefix ablate)")
        arms = read_summary_csv(summary_csv, metric)
        reference = re.search(r"Reference arm: (\S+?)\.", summary_md.read_text())
        dead: dict[str, float] = {}
        runs_csv = folder / "runs.csv"
        if runs_csv.is_file():
            with open(runs_csv, newline="") as f:
                for run in csv.DictReader(f):
                    value = run.get("val/dead_experts")
                    if value not in (None, "", "nan"):
                        dead[run["arm"]] = max(dead.get(run["arm"], 0.0), float(value))
        for arm, f in arms.items():
            if np.isnan(f["diff"]):
                continue  # the reference, an untested arm, or too few seeds
            low, high = f.get("diff_ci_low", np.nan), f.get("diff_ci_high", np.nan)  # older summaries lack them
            interval = f"[{_fmt(scale * low, '+.2f')}, {_fmt(scale * high, '+.2f')}]"
            lines.append(
                f"| {folder.name} | {arm} | {int(f['n'])} | {_fmt(scale * f['mean'], '.2f')} "
                f"| {_fmt(scale * f['diff'], '+.2f')} {interval} vs {reference.group(1) if reference else '?'} "
                f"| {_fmt(f['p_holm'], '.3f')} | {_fmt(f['p_example_holm'], '.2g')} "
                f"| {_fmt(dead.get(arm, np.nan), '.0f')} |"
            )
    return "\n".join(lines) + "\n"
