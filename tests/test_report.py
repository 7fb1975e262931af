"""analyze_run on tiny run directories, scripts/analyze.py, and the analysis notebooks end to end."""

import csv
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import tiny_run_overrides, write_reviews_csv
from nbclient import NotebookClient
from test_gem import gem_cache, tiny_gem4_overrides  # noqa: F401  (gem_cache: a fixture, a fake GEM artefact)

from moe_prefix.analysis import probes
from moe_prefix.tools.analyze import analyze_run, prompt_batches
from moe_prefix.train.engine import fit
from moe_prefix.train.run_config import load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import analyze as analyze_script  # noqa: E402

RUNS = {
    "concat": {
        "prefix.num_experts": 3,
        "prefix.top_k": 2,
        "prefix.combine": "concat",
        "trainer.log_every_n_steps": 1,
    },
    # Soft routing over two banks of fixed lengths 1 and 4: each example's blended length varies.
    "lengths": {
        "prefix.routing": "soft",
        "prefix.top_k": "null",
        "prefix.length": "expert",
        "prefix.expert_lengths": "[1,4]",
    },
    "one": {"prefix.num_experts": 1},
    "decoupled": {"prefix.prefix_mode": "decoupled"},
    "baseline": {"model.method": "linear_probe"},
}


@pytest.fixture(scope="module")
def runs(tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    csv_path = write_reviews_csv(root / "reviews.csv")
    out = {}
    for name, extra in RUNS.items():
        cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, csv_path, root / name, **extra))
        out[name] = fit(cfg).run_dir
    return out


def _figures(report: Path) -> set[str]:
    """PNG names the report links to; every one of them must exist."""
    names = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\.png\)", report.read_text()))
    for name in names:
        assert (report.parent / f"{name}.png").stat().st_size > 1000, name
    return names


@pytest.mark.slow  # analyses whole fits
def test_analyze_run_writes_report_with_all_sections(runs):
    report = analyze_run(runs["concat"], max_examples=24, progress=False)
    assert report == runs["concat"] / "analysis" / "report.md"
    text = report.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    for title in ("Routing by group", "over training", "collapse", "attention mass λ", "Prefix lengths", "geometry"):
        assert any(title in h for h in headings), title
    assert re.search(r"NMI = [0-9.]+, p [=<] [0-9.]+", text)
    assert "95 % CI" in text and "of 24 validation examples" in text
    assert _figures(report) == {
        "routing_heatmap",
        "training_routing",
        "lambda_layer_head",
        "lambda_expert",
        "lambda_group",
        "expert_similarity",
        "key_distance",
    }
    assert "the same prefix length (4)" in text  # fixed lengths: the section says why it is skipped


@pytest.mark.slow  # analyses whole fits
def test_analyze_run_correlates_varying_lengths(runs):
    report = analyze_run(runs["lengths"], progress=False)
    text = report.read_text()
    assert "prefix_length" in _figures(report)
    assert re.search(r"Spearman ρ\(prefix length, input tokens\) = -?[0-9.]+ \(95 % CI", text)
    assert "blend mode mixes the banks" in text


@pytest.mark.parametrize(
    "name,sentences,figures",
    [
        ("one", ["one expert, so every example", "one expert cannot collapse"], {"lambda_layer_head", "key_distance"}),
        ("decoupled", ["decoupled adds the experts outside the softmax"], {"routing_heatmap", "key_distance"}),
        ("baseline", ["no router (a baseline)", "baseline has no prefix banks"], set()),
    ],
)
@pytest.mark.slow  # analyses whole fits
def test_analyze_run_skips_what_does_not_apply(runs, name, sentences, figures):
    report = analyze_run(runs[name], progress=False)
    text = report.read_text()
    for sentence in sentences:
        assert sentence in text
    assert figures <= _figures(report)
    if name == "baseline":
        assert not list(report.parent.glob("*.png"))


@pytest.mark.slow  # analyses whole fits
def test_script_prints_report_path_or_fails_in_one_line(runs, tmp_path, capsys):
    assert analyze_script.main([str(runs["one"]), "--max-examples", "8"]) == 0
    out = capsys.readouterr().out
    assert out.split()[-1] == str(runs["one"] / "analysis" / "report.md")

    assert analyze_script.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {tmp_path} is not a run directory (no config.yaml)"]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.slow  # analyses whole fits
@pytest.mark.parametrize("name", ["routing_behaviour", "prefix_attention"])
def test_notebook_stored_without_outputs_runs_on_a_run_dir(runs, name, monkeypatch, tmp_path):
    nb = nbformat.read(ROOT / "analysis" / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    monkeypatch.setenv("MOE_PREFIX_RUN_DIR", str(runs["concat"]))
    monkeypatch.setenv("MOE_PREFIX_MAX_EXAMPLES", "16")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} produced no figure"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow  # analyses whole fits
def test_analyze_run_reads_a_generation_routing_table(runs, tmp_path):
    """Generation runs write routing.csv without group, label and prediction columns (their probes are checked on
    real generation runs in test_generation.py and test_seq2seq_training.py)."""
    run = shutil.copytree(runs["concat"], tmp_path / "generation")
    with open(run / "routing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = ["id", "input_len", "loss", "prefix_len", "experts", "w0", "w1", "w2"]
    with open(run / "routing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = analyze_run(run, progress=False).read_text()
    assert "fewer than two groups" in text and "Mean λ over layers and heads" in text


def test_prompt_batches_give_each_source_the_lambda_of_its_prompts_alone(gem_cache, tiny_lm_dir, tmp_path):  # noqa: F811
    """λ of a gem4 run's validation prompts, batched and left-padded as decoding sees them, equals λ of each
    prompt run alone, and each row's group id names its own source."""
    from moe_prefix.train.generation import build

    built = build(load_config(None, tiny_gem4_overrides(tiny_lm_dir, tmp_path / "run")))
    data, mixture = built.data, built.network.mixture
    batched = probes.prefix_attention_mass(mixture, prompt_batches(data), progress=False)
    assert sorted(batched["index"].tolist()) == list(range(len(data.val_examples)))
    sources = [data.group_names[g] for g in batched["group_ids"]]
    assert sources == [data.val_examples[i]["group"] for i in batched["index"]]
    assert len(set(sources)) == 4
    for row, i in enumerate(batched["index"]):
        alone = probes.prefix_attention_mass(mixture, data.generation_loader([data.val_prompts[i]], data.val_examples))
        torch.testing.assert_close(batched["total"][row], alone["total"][0], atol=1e-5, rtol=1e-4)
    assert 0.01 < batched["total"].mean() < 0.99


@pytest.mark.slow  # a fit and a notebook
def test_routing_notebook_shows_gem4_routing_and_lambda_per_source(gem_cache, tiny_lm_dir, tmp_path, monkeypatch):  # noqa: F811
    """The gem4 section reads the run named by MOE_PREFIX_GEM4_RUN_DIR: a source x expert figure and table, then
    λ per source; here both variables name one tiny gem4 run."""
    run = fit(load_config(None, tiny_gem4_overrides(tiny_lm_dir, tmp_path / "gem4"))).run_dir
    nb = nbformat.read(ROOT / "analysis" / "routing_behaviour.ipynb", as_version=4)
    monkeypatch.setenv("MOE_PREFIX_RUN_DIR", str(run))
    monkeypatch.setenv("MOE_PREFIX_GEM4_RUN_DIR", str(run))
    monkeypatch.setenv("MOE_PREFIX_MAX_EXAMPLES", "8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    gem4_cells = code[-2:]
    for cell in gem4_cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:60]
    text = "".join(o.get("text", "") for c in gem4_cells for o in c.outputs)
    assert "NMI(top-1 expert, source)" in text and text.count("λ = ") == 4
    for source in ("e2e_nlg", "webnlg_en", "common_gen", "schema_guided_dialog"):
        assert text.count(source) == 2, source  # a row of the routing table and a row of λ
