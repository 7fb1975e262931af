"""🤗 `datasets` sources: parquet files, `save_to_disk` folders and hub ids (`hf:NAME[/CONFIG]`), read by the
`datasets` library and handed row by row to the same checks as every other source (the same one-line errors).
A DatasetDict (a saved folder or a hub dataset) has named splits; callers choose one with `split`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

from .records import DataError, require_column

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


def dataset_rows(
    source: str | Path, split: str | None, wanted: list[tuple[str, str]]
) -> tuple[str, Iterator[tuple[str, dict]]]:
    """Where (for messages) and the rows of a datasets source; `wanted` (column, option) are checked first."""
    table, where = _dataset_table(source, split)
    for column, option in wanted:
        require_column(column, table.column_names, option, where)
    if len(table) == 0:
        raise DataError(f"{where}: no examples (the table has no rows)")
    columns = list(dict.fromkeys(c for c, _ in wanted))
    if "id" in table.column_names and "id" not in columns:
        columns.append("id")
    return where, _table_rows(table, columns)
