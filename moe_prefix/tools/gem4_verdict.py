"""Issue 25's goal checked against the gem4 sweeps' published summaries: one table, one row per clause.

The goal, on each backbone: the mixture (`moe4_recipe`, the sweeps' reference arm) is ahead of the
equal-parameter single prefix by at least 1.5 macro-BLEU with Holm p < 0.05 at the seed and at the example
level, within 0.5 of oracle routing (where the sweep has an oracle arm), and the best prefix arm is at most
1 BLEU behind LoRA. Every figure is read from the runner's own summary.csv (Holm over the sweep's tested
arms, as the runner corrected it); a backbone whose sweep has fewer seeds than its sweep file plans is
marked interim (or, where it was stopped short, with the reason), and a clause whose arms have no finished
run yet names them instead of a figure.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from moe_prefix.tools.ablate_plan import load_sweep
from moe_prefix.tools.ablate_summary import read_summary_csv
from moe_prefix.train.run_config import ConfigError

MIXTURE, SINGLE, ORACLE, LORA = "moe4_recipe", "prefix1_equal_params", "oracle", "lora"
LEAD, ALPHA, ORACLE_TOLERANCE, LORA_GAP = 1.5, 0.05, 0.5, 1.0


@dataclass(frozen=True)
class Study:
    backbone: str
    folder: Path  # a published sweep folder (summary.csv)
    sweep_file: Path  # its sweep file: the planned seeds and the reference arm
    # why a sweep ended with fewer seeds than planned; its marks are then final, not "so far"
    stopped: str | None = None


def read_summary(folder: Path, metric: str) -> dict[str, dict[str, float]]:
    """summary.csv's rows of `metric`, by arm, numbers as floats (nan where empty)."""
    path = Path(folder) / "summary.csv"
    if not path.is_file():
        raise ConfigError(f"{path} not found: publish the sweep first (scripts/ablate.py SWEEP --publish DEST)")
    return read_summary_csv(path, metric)


def goal_rows(study: Study) -> list[dict[str, str]]:
    """The goal's clauses for one backbone: what was measured and whether the clause is met."""
    sweep = load_sweep(study.sweep_file)
    if sweep.reference != MIXTURE:
        raise ConfigError(
            f"{study.sweep_file}: the verdict reads Δ against {MIXTURE}, its reference is {sweep.reference}"
        )
    for needed in (MIXTURE, SINGLE, LORA):
        if needed not in sweep.arms:
            raise ConfigError(f"{study.sweep_file} has no {needed} arm: nothing to check the goal against")
    arms = read_summary(study.folder, sweep.metric)
    # a sweep under way: an arm with no finished run yet counts 0 seeds, and the clauses that need it wait for it
    seeds = int(min(arms[a]["n"] if a in arms else 0 for a in sweep.arms if a not in sweep.once))
    short = seeds < len(sweep.seeds)
    interim = short and study.stopped is None
    state = f"{seeds} of {len(sweep.seeds)}" + (f" ({study.stopped or 'interim'})" if short else "")
    header = {"backbone": study.backbone, "seeds": state}
    # a clause read on a few seeds can still turn: say so in the cell a reader's eye lands on
    so_far = " so far" if interim else ""
    marks = {True: f"yes{so_far}", False: f"**no**{so_far}", None: "–"}
    clauses = _clauses(arms, read_seed_scores(study.folder), sweep)
    return [{**header, "clause": c, "measured": m, "met": marks[met]} for c, m, met in clauses]


def read_seed_scores(folder: Path) -> dict[str, dict[int, float]] | None:
    """runs.csv's main metric by arm and seed (None without runs.csv: then the summary's means are used)."""
    path = Path(folder) / "runs.csv"
    if not path.is_file():
        return None
    scores: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["metric"]:
                scores.setdefault(row["arm"], {})[int(row["seed"])] = float(row["metric"])
    return scores


def _shared_seed_means(arms: dict, scores: dict[str, dict[int, float]] | None, *names: str) -> dict[str, float]:
    """The arms' means over the seeds they have all finished. While a sweep is under way its arms have different
    seeds, and a difference of means over different seeds would carry the seeds' own spread (large for prefix
    tuning, docs/gem4.md); once every seed is in, these are the summary's means."""
    shared = set.intersection(*(set(scores.get(n, ())) for n in names)) if scores else set()
    if not shared:
        return {n: arms[n]["mean"] for n in names}
    return {n: statistics.fmean(scores[n][seed] for seed in sorted(shared)) for n in names}


def _clauses(arms: dict, scores: dict | None, sweep) -> list[tuple[str, str, bool | None]]:
    """(clause, measured, met) in the goal's order; met is None for a clause whose arms have no finished run."""
    lead_clause = f"mixture − single prefix (equal parameters) ≥ +{LEAD}"
    if MIXTURE in arms and SINGLE in arms:
        clauses = _lead_clauses(arms, scores, lead_clause)
    else:
        clauses = [(lead_clause, _waiting(arms, MIXTURE, SINGLE), None)]
    if MIXTURE in arms and ORACLE in arms:
        m = _shared_seed_means(arms, scores, MIXTURE, ORACLE)
        ahead_of_oracle = m[MIXTURE] - m[ORACLE]
        clauses.append(
            (
                f"mixture within {ORACLE_TOLERANCE} of oracle routing (or ahead)",
                f"mixture − oracle = {ahead_of_oracle:+.2f}",
                ahead_of_oracle >= -ORACLE_TOLERANCE,
            )
        )
    lora_clause = f"LoRA − best prefix arm ≤ {LORA_GAP}"
    # "the best prefix arm": neither LoRA nor an arm that trains nothing (the few-shot backbone, run once)
    prefix_names = [a for a in arms if a != LORA and a not in sweep.once]
    if LORA in arms and prefix_names:
        m = _shared_seed_means(arms, scores, LORA, *prefix_names)
        best = max(prefix_names, key=m.get)
        gap = m[LORA] - m[best]
        measured = f"{m[LORA]:.2f} − {m[best]:.2f} ({best}) = {gap:+.2f}"
        clauses.append((lora_clause, measured, gap <= LORA_GAP))
    else:
        clauses.append((lora_clause, _waiting(arms, LORA, MIXTURE, SINGLE), None))
    return clauses


def _waiting(arms: dict, *needed: str) -> str:
    return f"– (no finished run of {', '.join(a for a in needed if a not in arms)} yet)"


def _lead_clauses(arms: dict, scores: dict | None, lead_clause: str) -> list[tuple[str, str, bool | None]]:
    """The mixture's lead over the equal-parameter single prefix, and its two tests."""
    single = arms[SINGLE]
    # summary.csv holds arm - reference over matched seeds; the goal reads mixture - single prefix. Without
    # matched seeds (one seed so far) the runner tests nothing: the lead is then the difference of the means.
    m = _shared_seed_means(arms, scores, MIXTURE, SINGLE)
    lead = -single["diff"] if math.isfinite(single["diff"]) else m[MIXTURE] - m[SINGLE]
    ahead = lead > 0
    interval = f"[{_signed(-single['diff_ci_high'])}, {_signed(-single['diff_ci_low'])}]"
    clauses = [(lead_clause, f"{lead:+.2f} {interval}", lead >= LEAD)]
    for level, column in (("seed", "p_holm"), ("example", "p_example_holm")):
        p = single[column]
        clauses.append((f"… {level} level, Holm p < {ALPHA}", _p(p, ahead), ahead and p < ALPHA))
    return clauses


def _p(p: float, ahead: bool) -> str:
    if not math.isfinite(p):
        return "– (no test: too few matched seeds)"
    return f"{p:.3g}" + ("" if ahead else " (mixture behind)")


def _signed(x: float) -> str:
    return f"{x:+.2f}" if math.isfinite(x) else "–"


def verdict_markdown(studies: list[Study]) -> str:
    """One Markdown table of every backbone's clauses; a backbone not published yet is named under it."""
    rows, missing = [], []
    for study in studies:
        if (Path(study.folder) / "summary.csv").is_file():
            rows += goal_rows(study)
        else:
            missing.append(study)
    header = ["backbone", "seeds", "clause", "measured", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[k] for k in header) + " |" for r in rows]
    for study in missing:
        lines += ["", f"{study.backbone}: no published summary in {_shown(study.folder)} yet (sweep not run)."]
    return "\n".join(lines) + "\n"


def _shown(folder: Path) -> str:
    """The folder relative to the working directory where it lies under it (no machine paths in docs)."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)
