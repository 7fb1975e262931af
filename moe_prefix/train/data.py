"""Tabular data loading: built-in pinned datasets and the user's own CSV / TSV / JSONL files.

Why a module of its own: every run starts here, and a bad file should fail in one readable line
(which file, which line, which column, which option to set) before any model loads. Nothing here
knows about Lightning or tokenizers; it returns plain Python records that the training side batches.

Two record shapes:
- classification: `TextExample(id, text, label, group)`; `group` is the domain a router may learn
  (for VADER: tweets, movies, amazon, nyt) and what the per-group metrics are reported on;
- generation (E2E NLG): `{"id", "input", "targets"}`, one record per distinct input with all its
  references, so a split by record can never leak an input's references across splits.

Labels are kept as the data spells them (a non-empty string or an int); `build_label_vocab` maps them
to class indices in a deterministic order.
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import assets

Label = str | int
T = TypeVar("T")


class DataError(ValueError):
    """Input data that cannot be used as given; the message says where and what to change."""


@dataclass
class TextExample:
    id: str  # unique within one dataset; joins per-example routing back to the data
    text: str
    label: Label
    group: str | None = None  # domain / subgroup, for routing analysis and per-group metrics


# ---------------------------------------------------------------------------------------------------
# reading files


def _read_text(path: Path) -> str:
    """Decode utf-8 (BOM tolerated); undecodable bytes become U+FFFD with one warning, not an error."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines = raw.split(b"\n")
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    warnings.warn(
        f"{path}: {bad} line(s) are not valid UTF-8; undecodable bytes were replaced by U+FFFD",
        stacklevel=3,
    )
    return raw.decode("utf-8-sig", errors="replace")


def _read_nonempty(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    return text


def _csv_rows(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Header columns and (line number, row) pairs of a delimited file."""
    # TSV files rarely quote, and a stray '"' at the start of a text would otherwise swallow lines
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(_read_nonempty(path), newline=""), delimiter=delimiter, quoting=quoting)
    columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[int, dict]]:
        try:
            for row in reader:
                if any(v not in (None, "") for v in row.values()):  # blank lines carry no example
                    yield reader.line_num, row
        except csv.Error as err:  # e.g. an unclosed quote running into a cell over the size limit
            raise DataError(f"{path}:{reader.line_num}: malformed {path.suffix[1:].upper()} ({err})") from None

    return columns, rows()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold raw
    for line_no, line in enumerate(_read_nonempty(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


# ---------------------------------------------------------------------------------------------------
# VADER sentences in four domains (Hutto & Gilbert, ICWSM 2014)

VADER_FILES = {  # domain -> file, in the order the examples are returned
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
VADER_COLUMNS = ["id", "text", "label", "score", "group"]


def _vader_rows(folder: Path) -> Iterator[tuple[int, dict]]:
    """Rows {id, text, label, score, group} of the four ground-truth files, score 0 dropped.

    label is "positive" (score > 0) or "negative"; the label vocabulary maps these to 1 / 0, so the
    class index equals int(score > 0). The mean human rating (-4..4) stays in `score` for other binnings.
    """
    for domain, name in VADER_FILES.items():
        path = folder / name
        lines = _read_nonempty(path).split("\n")
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
# rows -> examples


def _normalise_label(value: Any) -> Label:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("expected a non-empty string or an integer")


def _parse_label(value: Any, label_fn: Callable[[Any], Any] | None) -> Label:
    return _normalise_label(label_fn(value) if label_fn is not None else value)


def _require_column(column: str, columns: Iterable[str], option: str, where: str) -> None:
    columns = list(columns)
    if column not in columns:
        present = ", ".join(str(c) for c in columns) or "none"
        raise DataError(f"{where}: no column {column!r} (columns present: {present}); set {option}")


def _to_examples(
    rows: Iterable[tuple[int, dict]],
    where: str,
    text_column: str,
    label_column: str,
    group_column: str | None,
    label_fn: Callable[[Any], Any] | None,
) -> list[TextExample]:
    wanted = [(text_column, "data.text_column"), (label_column, "data.label_column")]
    if group_column is not None:
        wanted.append((group_column, "data.group_column"))
    examples: list[TextExample] = []
    seen: set[str] = set()
    for index, (line_no, row) in enumerate(rows):
        for column, option in wanted:  # JSONL records may differ, so every row is checked
            _require_column(column, row.keys(), option, where)
        text, raw_label = row[text_column], row[label_column]
        if text is None:
            raise DataError(f"{where}:{line_no}: no value in text column {text_column!r}")
        try:
            label = _parse_label(raw_label, label_fn)
        except Exception as err:  # label_fn is the user's code: any failure is a data error here
            raise DataError(
                f"{where}:{line_no}: cannot parse label {raw_label!r} in column {label_column!r} ({err})"
            ) from None
        example_id = str(row["id"]) if row.get("id") not in (None, "") else str(index)
        if example_id in seen:
            raise DataError(f"{where}:{line_no}: duplicate id {example_id!r}; ids must be unique")
        seen.add(example_id)
        group = row[group_column] if group_column is not None else None
        examples.append(TextExample(example_id, str(text), label, None if group is None else str(group)))
    if not examples:
        raise DataError(f"{where}: no examples (only a header or blank lines)")
    return examples


def _resolve_file(source: str | Path) -> Path:
    path = assets.resolve_dataset(source)
    if not path.exists():
        known = ", ".join(assets.DATA_ALIASES)
        raise DataError(f"data file not found: {path} (built-in datasets: {known})")
    return path


def load_examples(
    source: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    label_fn: Callable[[Any], Any] | None = None,
) -> list[TextExample]:
    """Classification examples from a built-in alias (`vader_domains`) or a .csv / .tsv / .jsonl file.

    Columns are chosen by name. A column named `id`, when present, gives the example ids; otherwise
    the row's position does. The VADER loader exposes the columns id, text, label, score, group, so
    the same config keys select from it as from a file. `label_fn` maps the raw cell to a label.
    """
    if str(source) == "e2e_nlg":
        raise DataError("e2e_nlg is a generation dataset: load it with load_e2e, not load_examples")
    path = _resolve_file(source)
    where = str(path)
    if str(source) == "vader_domains":
        columns, rows = VADER_COLUMNS, _vader_rows(path)
    elif path.suffix == ".csv":
        columns, rows = _csv_rows(path, ",")
    elif path.suffix == ".tsv":
        columns, rows = _csv_rows(path, "\t")
    elif path.suffix == ".jsonl":
        columns, rows = None, _jsonl_rows(path)
    else:
        raise DataError(f"unsupported data file {path}: use .csv, .tsv, .jsonl or a built-in dataset")
    if columns is not None:  # fail on a wrong column name before reading any row
        _require_column(text_column, columns, "data.text_column", where)
        _require_column(label_column, columns, "data.label_column", where)
        if group_column is not None:
            _require_column(group_column, columns, "data.group_column", where)
    return _to_examples(rows, where, text_column, label_column, group_column, label_fn)


# ---------------------------------------------------------------------------------------------------
# E2E NLG (BIG-bench gem/e2e_nlg): meaning representation -> restaurant description


def load_e2e(path: str | Path = "e2e_nlg") -> list[dict]:
    """Records {id, input, targets: list[str]}, one per distinct input, in first-seen order.

    `path` is the alias `e2e_nlg`, a folder holding task.json, or the task.json file itself.
    """
    path = _resolve_file(path)
    if path.is_dir():
        path = path / "task.json"
    try:
        task = json.loads(_read_nonempty(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise DataError(f"{path}: expected a BIG-bench task with an 'examples' list")
    grouped: dict[str, list[str]] = {}
    for i, example in enumerate(task["examples"]):
        if not isinstance(example, dict) or "input" not in example or "target" not in example:
            raise DataError(f"{path}: example {i} lacks 'input' or 'target'")
        target = example["target"]
        grouped.setdefault(example["input"], []).extend([target] if isinstance(target, str) else target)
    if not grouped:
        raise DataError(f"{path}: no examples")
    return [{"id": f"e2e-{i}", "input": inp, "targets": targets} for i, (inp, targets) in enumerate(grouped.items())]


# ---------------------------------------------------------------------------------------------------
# splits and labels


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of range(n); both sides non-empty, each in ascending order."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise DataError(f"cannot split {n} item(s) into non-empty train and validation sets")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def train_val_split(examples: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded random (unstratified) split; the same seed and data give the same split on every run."""
    train_idx, val_idx = _split_indices(len(examples), val_fraction, seed)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx]


def split_by_input(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split generation records so that no `input` appears on both sides; the fraction counts inputs."""
    inputs = list(dict.fromkeys(r["input"] for r in records))  # distinct, first-seen order
    _, val_idx = _split_indices(len(inputs), val_fraction, seed)
    val_inputs = {inputs[i] for i in val_idx}
    train = [r for r in records if r["input"] not in val_inputs]
    val = [r for r in records if r["input"] in val_inputs]
    return train, val


def _label_order(label: Label) -> tuple[int, Label]:
    return (0, label) if isinstance(label, int) else (1, label)  # ints numerically, then strings


def build_label_vocab(train_examples: Iterable[TextExample]) -> dict[Label, int]:
    """Label -> class index, sorted (ints numerically, then strings), so it never depends on row order."""
    labels = sorted({ex.label for ex in train_examples}, key=_label_order)
    return {label: i for i, label in enumerate(labels)}


def check_labels(train: Iterable[TextExample], val: Iterable[TextExample]) -> None:
    """Fail when validation holds a label the training split never shows: the head has no class for it."""
    seen = {ex.label for ex in train}
    unseen = sorted({ex.label for ex in val} - seen, key=_label_order)
    if unseen:
        known = sorted(seen, key=_label_order)
        raise DataError(f"validation labels never seen in training: {unseen} (training labels: {known})")
