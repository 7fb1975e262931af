"""Tests of data loading: small generated files for formats and errors, the real datasets marked slow."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from moe_prefix.train import assets
from moe_prefix.train.data import (
    VADER_FILES,
    DataError,
    TextExample,
    build_label_vocab,
    check_labels,
    load_e2e,
    load_examples,
    split_by_input,
    train_val_split,
)

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
    with pytest.raises(DataError, match="load_e2e"):
        load_examples("e2e_nlg")


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
