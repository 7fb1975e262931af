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
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import assets, gem
from .builtin_sources import (
    MULTISOURCE_COLUMNS,
    VADER_COLUMNS,
    bigbench_examples,
    multisource_rows,
    vader_rows,
)
from .hf_sources import SUPPORTED, dataset_rows, uses_datasets
from .records import DataError, Label, TextExample, csv_rows, jsonl_rows, preview, require_column

T = TypeVar("T")

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


def _check_text(text: Any, where: str, line_no: int | str, column: str) -> str:
    """The text of a row; None or a non-string (a JSON object, a number) is an error, not str()-ed."""
    if text is None:
        raise DataError(f"{where}:{line_no}: no value in text column {column!r}")
    if not isinstance(text, str):
        raise DataError(
            f"{where}:{line_no}: text column {column!r} holds a value of type {type(text).__name__} "
            f"({preview(text)}); expected a string"
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
        f"({preview(value)}); expected a string or an integer"
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
            require_column(column, row.keys(), option, where)
        text = _check_text(row[text_column], where, line_no, text_column)
        raw_label = row[label_column]
        try:
            label = _parse_label(raw_label, label_fn)
        except Exception as err:  # label_fn is the user's code: any failure is a data error here
            raise DataError(
                f"{where}:{line_no}: cannot parse label {preview(raw_label)} in column {label_column!r} ({err})"
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
        where, rows = dataset_rows(source, split, wanted)
        return _to_examples(rows, where, text_column, label_column, group_column, label_fn, drop_empty_texts)
    if str(source) in ("multisource4", "multisource4_shared"):  # assembled from several files: no one path
        for column, option in wanted:
            require_column(column, MULTISOURCE_COLUMNS, option, str(source))
        rows = multisource_rows(str(source), seed)
        return _to_examples(rows, str(source), text_column, label_column, group_column, label_fn, drop_empty_texts)
    path = _resolve_file(source)
    where = str(path)
    if str(source) == "vader_domains":
        columns, rows = VADER_COLUMNS, vader_rows(path)
    elif path.suffix == ".csv":
        columns, rows = csv_rows(path, ",")
    elif path.suffix == ".tsv":
        columns, rows = csv_rows(path, "\t")
    elif path.suffix == ".jsonl":
        columns, rows = None, jsonl_rows(path)
    elif path.is_dir():
        raise DataError(f"{path} is a folder but not one written by save_to_disk (no dataset_dict.json or state.json)")
    else:
        raise DataError(f"unsupported data file {path}: use {SUPPORTED}")
    if columns is not None:  # fail on a wrong column name before reading any row
        for column, option in wanted:
            require_column(column, columns, option, where)
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
    for i, example in enumerate(bigbench_examples(path)):
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
        require_column(input_column, row.keys(), "data.text_column", where)
        require_column(target_column, row.keys(), "data.label_column", where)
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
        where, rows = dataset_rows(source, split, wanted)
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
    return _group_references(jsonl_rows(path), str(path), input_column, target_column, drop_empty_texts)


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
