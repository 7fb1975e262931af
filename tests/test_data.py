"""Tests of data loading: small generated files for formats and errors, the real datasets marked slow."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from moe_prefix.train import assets
from moe_prefix.train.builtin_sources import VADER_FILES
from moe_prefix.train.data import (
    build_label_vocab,
    check_classes,
    check_labels,
    load_e2e,
    load_examples,
    load_generation_records,
    split_by_input,
    train_val_split,
)
from moe_prefix.train.hf_sources import hub_candidates, source_splits
from moe_prefix.train.records import DataError, TextExample

os.environ["HF_HUB_OFFLINE"] = "1"


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _ex(label, i=0) -> TextExample:
    return TextExample(str(i), "t", label)


# ---------------------------------------------------------------------------------------------------
# formats


def test_load_csv_custom_columns(tmp_path):
    path = _write(tmp_path / "d.csv", 'sentence,sentiment,domain\n"good, really",pos,web\nbad,neg,news\n\n')
    examples = load_examples(path, "sentence", "sentiment", "domain")
    assert examples == [
        TextExample("0", "good, really", "pos", "web"),
        TextExample("1", "bad", "neg", "news"),
    ]


def test_load_csv_uses_id_column(tmp_path):
    path = _write(tmp_path / "d.csv", "id,text,label\na7,x,1\nb9,y,0\n")
    assert [ex.id for ex in load_examples(path)] == ["a7", "b9"]
    assert [ex.label for ex in load_examples(path)] == ["1", "0"]  # csv cells stay strings
    assert [ex.label for ex in load_examples(path, label_fn=int)] == [1, 0]


def test_load_tsv_keeps_quotes(tmp_path):
    path = _write(tmp_path / "d.tsv", 'txt\ty\n"quoted start\ta\nplain\tb\n')
    assert [ex.text for ex in load_examples(path, "txt", "y")] == ['"quoted start', "plain"]


def test_load_jsonl_label_types(tmp_path):
    lines = [{"q": "a", "y": 1}, {"q": "b", "y": 0.0}, {"q": "c", "y": True}, {"q": "d", "y": " cat "}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert [ex.label for ex in load_examples(path, "q", "y")] == [1, 0, 1, "cat"]


def test_label_fn_bins_scores(tmp_path):
    path = _write(tmp_path / "d.csv", "text,score\na,2.5\nb,-1\n")
    examples = load_examples(path, label_column="score", label_fn=lambda s: float(s) > 0)
    assert [ex.label for ex in examples] == [1, 0]  # a bool from label_fn becomes an int


def test_non_utf8_is_replaced_with_a_warning(tmp_path):
    path = _write(tmp_path / "d.csv", b"text,label\ncaf\xe9,a\nok,b\n\xff\xfe,a\n")
    with pytest.warns(UserWarning, match="2 line"):
        examples = load_examples(path)
    assert examples[0].text == "caf\ufffd" and examples[1].text == "ok"


def test_utf8_bom_is_dropped(tmp_path):
    path = _write(tmp_path / "d.csv", "\ufefftext,label\nx,a\n")
    assert load_examples(path)[0].text == "x"


# ---------------------------------------------------------------------------------------------------
# errors


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.csv"):
        load_examples(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    with pytest.raises(DataError, match="empty"):
        load_examples(_write(tmp_path / "d.csv", content))


def test_header_only_file(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_examples(_write(tmp_path / "d.csv", "text,label\n"))


def test_missing_column_lists_columns_and_option(tmp_path):
    path = _write(tmp_path / "d.csv", "sentence,label\nx,a\n")
    msg = r"no column 'text' \(columns present: sentence, label\); set data.text_column"
    with pytest.raises(DataError, match=msg):
        load_examples(path)
    with pytest.raises(DataError, match="set data.group_column"):
        load_examples(path, "sentence", group_column="domain")


def test_missing_column_in_jsonl_record(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "lbl": 0}\n')
    msg = r"no column 'label' \(columns present: text, lbl\); set data.label_column"
    with pytest.raises(DataError, match=msg):
        load_examples(path)


def test_bad_json_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    ("content", "kwargs"),
    [("text,label\na,\n", {}), ("text,label\na,x\n", {"label_fn": int}), ("text,label\na\n", {})],
)
def test_unparseable_label(tmp_path, content, kwargs):
    with pytest.raises(DataError, match=r"d\.csv:2: cannot parse label"):
        load_examples(_write(tmp_path / "d.csv", content), **kwargs)


def test_fractional_json_label_is_unparseable(tmp_path):
    with pytest.raises(DataError, match="cannot parse label 0.5"):
        load_examples(_write(tmp_path / "d.jsonl", '{"text": "a", "label": 0.5}\n'))


def test_malformed_csv(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\n" + '"' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"d\.csv:\d+: malformed CSV"):
        load_examples(path)


def test_duplicate_ids(tmp_path):
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_examples(_write(tmp_path / "d.csv", "id,text,label\na,x,1\na,y,0\n"))


def test_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match=r"use \.csv, \.tsv, \.jsonl, \.parquet, a save_to_disk folder"):
        load_examples(_write(tmp_path / "d.xlsx", "x"))


def test_e2e_is_not_a_classification_source():
    with pytest.raises(DataError, match="model.task=generation"):
        load_examples("e2e_nlg")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": {"a": 1}}, r"d\.jsonl:2: text column 'text' holds a value of type dict \(\{'a': 1\}\); expected a"),
        ({"text": 7}, r"d\.jsonl:2: text column 'text' holds a value of type int \(7\); expected a string"),
        ({"label": {"a": 1}}, r"d\.jsonl:2: cannot parse label \{'a': 1\} in column 'label'"),
        ({"label": [1]}, r"d\.jsonl:2: cannot parse label \[1\]"),
        ({"g": ["web"]}, r"d\.jsonl:2: group column 'g' holds a value of type list .*expected a string or an integer"),
        ({"g": 0.5}, r"group column 'g' holds a value of type float \(0\.5\)"),
    ],
)
def test_jsonl_values_of_the_wrong_type(tmp_path, row, message):
    """An object where a text belongs was trained on as its repr; now each wrong type is a one-line error."""
    good = {"text": "fine", "label": "y", "g": "web"}
    path = _write(tmp_path / "d.jsonl", json.dumps(good) + "\n" + json.dumps(good | row) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(path, group_column="g")


def test_integer_group_values_name_groups(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1, "g": 3}\n')
    assert load_examples(path, group_column="g")[0].group == "3"


def test_empty_texts_warn_with_their_count_and_can_be_dropped(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\ngood,a\n,b\n   ,a\nbad,b\n")
    with pytest.warns(UserWarning, match=r"2 of 4 rows have an empty text in column 'text'; they were kept"):
        assert [ex.text for ex in load_examples(path)] == ["good", "", "   ", "bad"]
    with pytest.warns(UserWarning, match=r"2 of 4 rows .* were dropped \(data\.drop_empty_texts=true\)"):
        kept = load_examples(path, drop_empty_texts=True)
    assert [(ex.id, ex.text) for ex in kept] == [("0", "good"), ("3", "bad")]  # ids do not shift
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no examples left: all 1 texts are empty"):
        load_examples(_write(tmp_path / "e.csv", "text,label\n,b\n"), drop_empty_texts=True)


def test_empty_group_values_warn_and_belong_to_no_group(tmp_path):
    lines = ['{"text": "a", "label": 1, "g": "web"}', '{"text": "b", "label": 0, "g": ""}', '{"text": "c", "label": 0}']
    lines[2] = '{"text": "c", "label": 0, "g": null}'
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"2 of 3 rows have no value in group column 'g'; they belong to no group"):
        examples = load_examples(path, group_column="g")
    assert [ex.group for ex in examples] == ["web", None, None]  # no group named ""


def test_generation_inputs_empty_and_wrong_typed(tmp_path):
    rows = [{"mr": "a", "ref": "x"}, {"mr": "", "ref": "y"}, {"mr": "a", "ref": ["z"]}]
    path = _write(tmp_path / "g.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning, match="1 of 3 rows have an empty text in column 'mr'"):
        assert len(load_generation_records(path, "mr", "ref")) == 2
    with pytest.warns(UserWarning, match="dropped"):
        assert load_generation_records(path, "mr", "ref", drop_empty_texts=True) == [
            {"id": "0", "input": "a", "targets": ["x", "z"]}
        ]
    bad = _write(tmp_path / "b.jsonl", json.dumps({"mr": {"k": 1}, "ref": "x"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:1: expected a string input"):
        load_generation_records(bad, "mr", "ref")


# ---------------------------------------------------------------------------------------------------
# 🤗 datasets sources: parquet, save_to_disk folders, hub ids (made here, offline)


def _table(n=6, class_label=False, **columns):
    import datasets

    values = {"text": [f"t{i}" for i in range(n)], "label": [i % 2 for i in range(n)], **columns}
    features = None
    if class_label:
        features = datasets.Features(
            {k: datasets.Value("string") for k in values} | {"label": datasets.ClassLabel(names=["neg", "pos"])}
        )
    return datasets.Dataset.from_dict(values, features=features)


def test_parquet_and_saved_folders_read_like_files(tmp_path):
    import datasets

    table = _table(site=["a", "b", "a", "b", "a", "b"])
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": table, "validation": _table(2)}).save_to_disk(str(tmp_path / "dict"))
    want = [TextExample(str(i), f"t{i}", i % 2, "ab"[i % 2]) for i in range(6)]
    assert load_examples(tmp_path / "d.parquet", group_column="site") == want
    assert load_examples(tmp_path / "one", group_column="site", split="ignored: one table") == want
    assert load_examples(tmp_path / "dict", group_column="site", split="train") == want
    assert [ex.text for ex in load_examples(tmp_path / "dict", split="validation")] == ["t0", "t1"]
    assert source_splits(tmp_path / "dict") == ["train", "validation"]
    assert source_splits(tmp_path / "one") == source_splits(tmp_path / "d.parquet") == []


def test_class_label_columns_give_their_names(tmp_path):
    path = tmp_path / "d.parquet"
    _table(4, class_label=True).to_parquet(str(path))  # the features travel in the parquet schema
    assert [ex.label for ex in load_examples(path)] == ["neg", "pos", "neg", "pos"]


def test_datasets_sources_keep_the_one_line_errors(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _table(), "test": _table(2)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: no split 'validation' \(splits present: train, test\); set data"):
        load_examples(tmp_path / "dict", split="validation")
    with pytest.raises(DataError, match=r"holds several splits \(train, test\); name one with data.train_split"):
        load_examples(tmp_path / "dict")
    msg = r"dict\[train\]: no column 'stars' \(columns present: text, label\); set data.label_column"
    with pytest.raises(DataError, match=msg):
        load_examples(tmp_path / "dict", label_column="stars", split="train")
    _table(3, label=["a", " ", "b"]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: cannot parse label ' ' in column 'label'"):
        load_examples(tmp_path / "bad.parquet")
    _table(2, text=[["a"], ["b"]]).save_to_disk(str(tmp_path / "lists"))
    with pytest.raises(DataError, match=r"lists:row 0: text column 'text' holds a value of type list"):
        load_examples(tmp_path / "lists")
    _table(0).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match=r"empty\.parquet: no examples \(the table has no rows\)"):
        load_examples(tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"not a readable parquet file"):
        load_examples(_write(tmp_path / "x.parquet", "not parquet"))
    with pytest.raises(DataError, match=r"data file not found: .*nope\.parquet"):
        load_examples(tmp_path / "nope.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"is a folder but not one written by save_to_disk"):
        load_examples(tmp_path / "folder")


def test_hub_ids_and_their_readings():
    assert hub_candidates("hf:imdb") == [("imdb", None)]
    assert hub_candidates("hf:glue/sst2") == [("glue/sst2", None), ("glue", "sst2")]  # an owner or a config
    assert hub_candidates("hf:nyu-mll/glue/sst2") == [("nyu-mll/glue", "sst2")]
    for bad in ("hf:", "hf:a//b", "hf:a/b/c/d"):
        with pytest.raises(DataError, match="is not a hub dataset id: use hf:NAME, hf:NAME/CONFIG"):
            hub_candidates(bad)


def test_hub_id_offline_fails_at_once_in_one_line():
    with pytest.raises(DataError) as err:
        load_examples("hf:moe-prefix-test/no-such-dataset")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("hf:moe-prefix-test/no-such-dataset: the Hugging Face hub is unreachable")
    assert "(HF_HUB_OFFLINE is set)" in message
    assert "save_to_disk(FOLDER)" in message and "data.source=FOLDER" in message


def test_generation_records_from_a_saved_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"mr": ["a", "b", "a"], "ref": ["x", "y", "z"]})
    val = datasets.Dataset.from_dict({"mr": ["c"], "ref": [["u", "v"]]})  # a list of references per row
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "gen"))
    assert load_generation_records(tmp_path / "gen", "mr", "ref", split="train") == [
        {"id": "0", "input": "a", "targets": ["x", "z"]},
        {"id": "1", "input": "b", "targets": ["y"]},
    ]
    assert load_generation_records(tmp_path / "gen", "mr", "ref", split="validation")[0]["targets"] == ["u", "v"]
    with pytest.raises(DataError, match=r"gen\[train\]: no column 'input' \(columns present: mr, ref\); set data"):
        load_generation_records(tmp_path / "gen", split="train")


# ---------------------------------------------------------------------------------------------------
# splits and labels


def test_train_val_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = train_val_split(items, 0.2, seed=3)
    assert len(val) == 20 and sorted(train + val) == items
    assert (train, val) == train_val_split(items, 0.2, seed=3)
    assert val != train_val_split(items, 0.2, seed=4)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_train_val_split_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split([1, 2, 3], fraction, seed=0)


def test_label_vocab_is_sorted():
    assert build_label_vocab([_ex("pos"), _ex("neg"), _ex("pos")]) == {"neg": 0, "pos": 1}
    assert build_label_vocab([_ex(10), _ex(2), _ex(1)]) == {1: 0, 2: 1, 10: 2}


def test_single_class_training_labels_are_an_error():
    check_classes([_ex("a"), _ex("b")], "stars")
    with pytest.raises(DataError, match=r"training data has a single class \('pos'\) in column 'stars'"):
        check_classes([_ex("pos"), _ex("pos", 1)], "stars")


def test_check_labels_names_unseen():
    check_labels([_ex("a"), _ex("b")], [_ex("b")])
    with pytest.raises(DataError, match=r"never seen in training: \['c'\]"):
        check_labels([_ex("a"), _ex("b")], [_ex("a"), _ex("c")])


# ---------------------------------------------------------------------------------------------------
# built-in datasets from a fake cache (the same code path as the real ones, minus the download)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    vader = tmp_path / "cache" / "vader_domains"
    vader.mkdir(parents=True)
    for name in VADER_FILES.values():
        rows = ["id\tsentiment\ttext", "1\t1.5\tnice one", "2\t0\tmeh", "3_1\t-2.25\tawful\tstuff"]
        _write(vader / name, "\ufeff" + "\r\n".join(rows) + "\r\n")
    e2e = tmp_path / "cache" / "e2e_nlg"
    e2e.mkdir()
    examples = [{"input": f"name: R{i % 5}", "target": f"t{i}"} for i in range(12)]
    examples.append({"input": "name: R0", "target": ["u1", "u2"]})
    _write(e2e / "task.json", json.dumps({"name": "e2e_nlg", "examples": examples}))
    return tmp_path / "cache"


def test_vader_parse(fake_cache):
    examples = load_examples("vader_domains", group_column="group")
    assert len(examples) == 8  # the score-0 row of each domain is dropped
    assert examples[2] == TextExample("movies-1", "nice one", "positive", "movies")
    assert examples[3] == TextExample("movies-3_1", "awful\tstuff", "negative", "movies")
    assert [ex.group for ex in examples[::2]] == list(VADER_FILES)
    assert build_label_vocab(examples) == {"negative": 0, "positive": 1}  # class index = int(score > 0)


def test_vader_score_column_with_label_fn(fake_cache):
    examples = load_examples("vader_domains", label_column="score", label_fn=lambda s: int(s > 2))
    assert [ex.label for ex in examples[:2]] == [0, 0] and examples[0].group is None


def test_e2e_groups_references(fake_cache):
    records = load_e2e("e2e_nlg")
    assert [r["input"] for r in records] == [f"name: R{i}" for i in range(5)]
    assert records[0] == {"id": "e2e-0", "input": "name: R0", "targets": ["t0", "t5", "t10", "u1", "u2"]}
    assert load_e2e(fake_cache / "e2e_nlg" / "task.json") == records


def test_split_by_input_never_leaks():
    records = [{"id": str(i), "input": f"in{i % 7}", "targets": ["x"]} for i in range(40)]
    train, val = split_by_input(records, 0.3, seed=0)
    assert not {r["input"] for r in train} & {r["input"] for r in val}
    assert len({r["input"] for r in val}) == 2 and len(train) + len(val) == 40
    assert (train, val) == split_by_input(records, 0.3, seed=0)


# ---------------------------------------------------------------------------------------------------
# slow: the real pinned datasets


@pytest.mark.slow
def test_vader_domains_counts():
    examples = load_examples("vader_domains", group_column="group")
    assert len(examples) == 23_320
    assert Counter(ex.group for ex in examples) == {
        "movies": 10_568,
        "nyt": 4_946,
        "tweets": 4_196,
        "amazon": 3_610,
    }
    assert len({ex.id for ex in examples}) == len(examples)
    assert set(build_label_vocab(examples)) == {"negative", "positive"}
    train, val = train_val_split(examples, 0.2, seed=0)
    check_labels(train, val)
    assert len(val) == 4_664


@pytest.mark.slow
def test_e2e_records_and_split():
    records = load_e2e("e2e_nlg")
    assert sum(len(r["targets"]) for r in records) == 1_000  # DESIGN's 1,000 examples ...
    assert len(records) == 213  # ... are 213 distinct inputs with 1 to 35 references each
    train, val = split_by_input(records, 0.2, seed=0)
    assert not {r["input"] for r in train} & {r["input"] for r in val}
    assert len(train) + len(val) == len(records)
