"""fit end to end on 🤗 `datasets` sources made here, offline: a parquet file, save_to_disk folders with and
without a validation split, ClassLabel columns, a generation DatasetDict. The same rows given as CSV and as
a datasets source give the same metrics."""

import csv
import json

import datasets
import pytest
from conftest import save_tiny_causal_lm, tiny_run_overrides, write_reviews_csv
from test_generation import overrides as generation_overrides
from test_generation import write_descriptions_jsonl

from moe_prefix.train.engine import evaluate_run, fit
from moe_prefix.train.run_config import load_config

pytestmark = pytest.mark.slow  # every test here is a whole fit

COMPARED = ("val/acc", "val/loss", "val/f1", "val/acc/cinema", "val/acc/kitchen")


def _fit(backbone, source, run_dir, **extra):
    return fit(load_config(None, tiny_run_overrides(backbone, source, run_dir, **extra)))


def _assert_same_metrics(got: dict, want: dict) -> None:
    for key in COMPARED:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _routing(run_dir) -> list[dict]:
    return _rows(run_dir / "routing.csv")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="module")
def csv_metrics(tiny_backbone_dir, reviews, tmp_path_factory):
    """The CSV with the seeded split: what every single-table source of the same rows must reproduce."""
    return _fit(tiny_backbone_dir, reviews, tmp_path_factory.mktemp("csv") / "run").metrics


def test_parquet_file_fits_like_the_csv(tiny_backbone_dir, reviews, csv_metrics, tmp_path):
    path = tmp_path / "reviews.parquet"
    datasets.Dataset.from_list(_rows(reviews)).to_parquet(str(path))
    result = _fit(tiny_backbone_dir, path, tmp_path / "run")
    _assert_same_metrics(result.metrics, csv_metrics)
    evaluated = evaluate_run(result.run_dir, str(path))  # evaluate --data reads parquet too
    assert evaluated.name == "reviews" and 0 <= evaluated.metrics["val/acc"] <= 1


def test_class_label_columns_keep_their_names(tiny_backbone_dir, reviews, csv_metrics, tmp_path):
    stars, sites = ["neg", "pos"], ["cinema", "kitchen"]
    features = datasets.Features(
        {
            "review": datasets.Value("string"),
            "stars": datasets.ClassLabel(names=stars),
            "site": datasets.ClassLabel(names=sites),
        }
    )
    rows = [
        {"review": r["review"], "stars": stars.index(r["stars"]), "site": sites.index(r["site"])}
        for r in _rows(reviews)
    ]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "table"))  # one Dataset
    result = _fit(tiny_backbone_dir, tmp_path / "table", tmp_path / "run")
    _assert_same_metrics(result.metrics, csv_metrics)  # the names are the labels, as in the CSV
    assert json.loads((result.run_dir / "labels.json").read_text()) == {"label_column": "stars", "classes": stars}
    routing = _routing(result.run_dir)
    assert {r["label_name"] for r in routing} == set(stars)
    assert {r["prediction_name"] for r in routing} <= set(stars)
    assert all(stars[int(r["label"])] == r["label_name"] for r in routing)
    assert {r["group"] for r in routing} == set(sites)


def test_folder_without_a_validation_split_uses_the_seeded_split(tiny_backbone_dir, reviews, csv_metrics, tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(reviews))}).save_to_disk(str(folder))
    result = _fit(tiny_backbone_dir, folder, tmp_path / "run")
    _assert_same_metrics(result.metrics, csv_metrics)
    assert len(_routing(result.run_dir)) == 32  # data.val_fraction=0.2 of 160


def test_dataset_dict_splits_give_the_metrics_of_the_same_rows_as_csv(tiny_backbone_dir, reviews, tmp_path):
    rows = _rows(reviews)
    train, val = rows[:120], rows[120:]
    from_csv = _fit(
        tiny_backbone_dir,
        _write_csv(tmp_path / "train.csv", train),
        tmp_path / "csv_run",
        **{"data.val_source": _write_csv(tmp_path / "val.csv", val)},
    )
    folder = tmp_path / "dict"
    splits = {"train": train, "validation": val, "test": val[:5]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    from_dict = _fit(tiny_backbone_dir, folder, tmp_path / "dict_run")
    _assert_same_metrics(from_dict.metrics, from_csv.metrics)
    assert len(_routing(from_dict.run_dir)) == len(val)


def test_generation_dataset_saved_to_disk(tmp_path):
    backbone = save_tiny_causal_lm(tmp_path / "tiny_llama")
    rows = [json.loads(line) for line in write_descriptions_jsonl(tmp_path / "d.jsonl").read_text().splitlines()]
    inputs = list(dict.fromkeys(r["mr"] for r in rows))
    held_out = set(inputs[-5:])  # not the seeded split's size (data.val_fraction=0.25 of 24 inputs: 6)

    def references(keep):  # one row per input with the list of its references
        grouped = {}
        for r in rows:
            if keep(r["mr"]):
                grouped.setdefault(r["mr"], []).append(r["ref"])
        return datasets.Dataset.from_dict({"mr": list(grouped), "ref": list(grouped.values())})

    splits = {"train": references(lambda mr: mr not in held_out), "validation": references(held_out.__contains__)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "gen"))
    result = fit(load_config(None, generation_overrides(backbone, tmp_path / "gen", tmp_path / "run")))
    assert {"val/bleu", "val/rougeL", "val/loss"} <= set(result.metrics)
    assert len(_routing(result.run_dir)) == 5  # one row per input of the validation split
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["references"] for s in samples] == splits["validation"]["ref"][: len(samples)] and samples
