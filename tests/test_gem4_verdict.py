"""The gem4 verdict reads the runner's summaries the right way round and marks each clause as the goal says."""

import csv
import statistics
from pathlib import Path

import pytest

from moe_prefix.tools.gem4_verdict import Study, goal_rows, verdict_markdown
from moe_prefix.train.run_config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["arm", "n", "mean", "diff", "p_holm", "p_example_holm", "metric", "diff_ci_low", "diff_ci_high"]


def _sweep_file(tmp_path: Path, arms: list[str], seeds: int) -> Path:
    overrides = {
        "moe4_recipe": "[]",
        "prefix1_equal_params": "[prefix.num_experts=1, prefix.top_k=1, prefix.prefix_len=64]",
        "oracle": "[prefix.router_input=group, prefix.router_init=by_group, prefix.balanced_routing=false, "
        "prefix.top_k=1]",
        "lora": "[model.method=lora]",
    }
    lines = [f"base: {ROOT / 'configs/gem4_smollm2.yaml'}", "reference: moe4_recipe", "metric: val/bleu_macro"]
    lines += [f"seeds: {list(range(seeds))}", "arms:", *(f"  {a}: {overrides[a]}" for a in arms)]
    path = tmp_path / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _summary(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"metric": "val/bleu_macro", **row})
    return folder


def _arm(arm, mean, diff="", p="", p_ex="", low="", high="", n=8):
    return {"arm": arm, "n": n, "mean": mean, "diff": diff, "p_holm": p, "p_example_holm": p_ex,
            "diff_ci_low": low, "diff_ci_high": high}  # fmt: skip


def test_clauses_met_when_the_mixture_leads_by_enough_with_both_tests_below_alpha(tmp_path):
    folder = _summary(
        tmp_path / "study",
        [
            _arm("moe4_recipe", 24.0),
            _arm("prefix1_equal_params", 22.0, -2.0, 0.03, 0.001, -2.5, -1.6),
            _arm("oracle", 24.3, 0.3, 0.5, 0.2, -0.1, 0.8),
            _arm("lora", 24.8, 0.8, 0.2, 0.1, 0.1, 1.2),
        ],
    )
    rows = goal_rows(
        Study("tiny", folder, _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "oracle", "lora"], 8))
    )
    assert [r["met"] for r in rows] == ["yes"] * 5
    assert rows[0]["measured"] == "+2.00 [+1.60, +2.50]"  # mixture - single prefix, the interval flipped with it
    assert rows[-1]["measured"] == "24.80 − 24.30 (oracle) = +0.50"  # the oracle is a prefix arm too
    assert {r["seeds"] for r in rows} == {"8 of 8"}


def test_a_small_p_with_the_mixture_behind_is_no_success_and_missing_seeds_are_interim(tmp_path):
    folder = _summary(
        tmp_path / "study",
        [
            _arm("moe4_recipe", 20.0, n=6),
            _arm("prefix1_equal_params", 22.0, 2.0, 0.01, 0.001, 1.0, 3.0, n=6),
            _arm("lora", 23.5, 3.5, 0.01, 0.001, 2.0, 5.0, n=6),
        ],
    )
    rows = goal_rows(Study("tiny", folder, _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 8)))
    assert [r["clause"].split(",")[0] for r in rows][1:3] == ["… seed level", "… example level"]
    # no oracle row without an oracle arm; 6 of 8 seeds: each mark says it can still turn
    assert [r["met"] for r in rows] == ["**no** so far"] * 4
    assert rows[1]["measured"] == "0.01 (mixture behind)"
    assert rows[3]["measured"] == "23.50 − 22.00 (prefix1_equal_params) = +1.50"
    assert {r["seeds"] for r in rows} == {"6 of 8 (interim)"}


def test_a_sweep_stopped_short_says_why_and_its_marks_are_final(tmp_path):
    folder = _summary(
        tmp_path / "study",
        [
            _arm("moe4_recipe", 16.5, n=4),
            _arm("prefix1_equal_params", 14.0, -2.5, 0.25, 0.0005, -5.1, -0.1, n=4),
            _arm("lora", 26.4, 9.9, 0.25, 0.0002, 9.0, 10.6, n=4),
        ],
    )
    sweep = _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 7)
    rows = goal_rows(Study("tiny", folder, sweep, stopped="stopped: data withdrawn"))
    assert {r["seeds"] for r in rows} == {"4 of 7 (stopped: data withdrawn)"}
    assert [r["met"] for r in rows] == ["yes", "**no**", "yes", "**no**"]


def test_one_seed_reads_the_difference_of_means_and_claims_no_test(tmp_path):
    folder = _summary(
        tmp_path / "study",
        [_arm("moe4_recipe", 20.0, n=1), _arm("prefix1_equal_params", 21.0, n=1), _arm("lora", 23.0, n=1)],
    )
    rows = goal_rows(Study("tiny", folder, _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 7)))
    assert rows[0]["measured"] == "-1.00 [–, –]"
    assert rows[1]["measured"] == "– (no test: too few matched seeds)" and rows[1]["met"] == "**no** so far"
    assert rows[0]["seeds"] == "1 of 7 (interim)"


def test_an_unpublished_backbone_is_named_and_a_missing_arm_is_an_error(tmp_path):
    sweep = _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 3)
    text = verdict_markdown([Study("Unrun", tmp_path / "nowhere", sweep)])
    assert "Unrun: no published summary" in text
    folder = _summary(tmp_path / "study", [_arm("moe4_recipe", 20.0), _arm("lora", 22.0, 2.0, 0.1, 0.1, 1.0, 3.0)])
    with pytest.raises(ConfigError, match="has no prefix1_equal_params arm"):
        goal_rows(Study("tiny", folder, _sweep_file(tmp_path, ["moe4_recipe", "lora"], 3)))


def test_a_sweep_under_way_checks_what_has_finished_and_names_the_arms_it_waits_for(tmp_path):
    """Planned arms without a finished run count 0 seeds; their clauses stay in the goal's order, unmarked."""
    sweep = _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 7)
    folder = _summary(tmp_path / "study", [_arm("moe4_recipe", 17.0, n=1), _arm("prefix1_equal_params", 13.5, n=1)])
    rows = goal_rows(Study("tiny", folder, sweep))
    assert [r["measured"] for r in rows] == [
        "+3.50 [–, –]",
        "– (no test: too few matched seeds)",
        "– (no test: too few matched seeds)",
        "– (no finished run of lora yet)",
    ]
    assert [r["met"] for r in rows] == ["yes so far", "**no** so far", "**no** so far", "–"]
    assert {r["seeds"] for r in rows} == {"0 of 7 (interim)"}
    rows = goal_rows(Study("tiny", _summary(tmp_path / "lora_only", [_arm("lora", 22.0, n=1)]), sweep))
    waiting = ("– (no finished run of moe4_recipe, prefix1_equal_params yet)", "–")
    assert [(r["measured"], r["met"]) for r in rows] == [waiting, waiting]  # LoRA has no prefix arm to lead yet


def test_an_interim_verdict_compares_arms_on_the_seeds_they_share(tmp_path):
    """The mixture has seeds 0 and 1, the single prefix and LoRA seed 0: lead and gap read seed 0 alone, not
    the mixture's two-seed mean against one seed of the others."""
    sweep = _sweep_file(tmp_path, ["moe4_recipe", "prefix1_equal_params", "lora"], 7)
    folder = _summary(
        tmp_path / "study",
        [_arm("moe4_recipe", 16.0, n=2), _arm("prefix1_equal_params", 13.0, n=1), _arm("lora", 28.0, n=1)],
    )
    runs = [("moe4_recipe", 0, 17.0), ("moe4_recipe", 1, 15.0), ("prefix1_equal_params", 0, 13.0), ("lora", 0, 28.0)]
    with open(folder / "runs.csv", "w", newline="") as f:
        f.write("arm,seed,metric\n" + "".join(f"{a},{seed},{v}\n" for a, seed, v in runs))
    rows = goal_rows(Study("tiny", folder, sweep))
    assert rows[0]["measured"] == "+4.00 [–, –]"  # 17 - 13 on seed 0, not 16 - 13
    assert rows[-1]["measured"] == "28.00 − 17.00 (moe4_recipe) = +11.00"
    assert {r["seeds"] for r in rows} == {"1 of 7 (interim)"}


def test_the_committed_smollm2_study_reads_the_same_differences_as_its_runs():
    """Independent of summary.csv's sign convention: the lead recomputed from runs.csv's per-seed values."""
    folder = ROOT / "docs/studies/gem4_smollm2"
    with open(folder / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = float(r["metric"])
    seeds = sorted(set(by_arm["moe4_recipe"]) & set(by_arm["prefix1_equal_params"]))
    lead = statistics.mean(by_arm["moe4_recipe"][s] - by_arm["prefix1_equal_params"][s] for s in seeds)
    lora_gap = statistics.mean(by_arm["lora"].values()) - max(
        statistics.mean(v.values()) for a, v in by_arm.items() if a not in ("lora", "fewshot")
    )
    rows = goal_rows(Study("SmolLM2", folder, ROOT / "configs/ablations/gem4_smollm2.yaml"))
    assert rows[0]["measured"].split()[0] == f"{lead:+.2f}"
    assert rows[-1]["measured"].endswith(f"= {lora_gap:+.2f}")


def test_the_command_prints_the_committed_verdict_and_fails_in_one_line_without_sweep_files(tmp_path, capsys):
    from moe_prefix.tools.cli import main

    study = ROOT / "docs/studies/gem4_smollm2"
    assert main(["gem4-verdict", "--smollm2", str(study), "--sweeps", str(ROOT / "configs/ablations")]) == 0
    assert "| SmolLM2-135M |" in capsys.readouterr().out
    code = main(["gem4-verdict", "--smollm2", str(study), "--sweeps", str(tmp_path)])
    output = "".join(capsys.readouterr())
    assert code == 2 and "sweep file not found" in output and "Traceback" not in output, output
