"""The records every data source ends in, the error they raise, and the readers of the user's files (text,
CSV / TSV, JSONL) that report a bad line by file, line and column."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Label = str | int


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


def read_text(path: Path) -> str:
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


def read_nonempty(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    return text


def csv_rows(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Header columns and (line number, row) pairs of a delimited file."""
    # TSV files rarely quote, and a stray '"' at the start of a text would otherwise swallow lines
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(read_nonempty(path), newline=""), delimiter=delimiter, quoting=quoting)
    columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[int, dict]]:
        try:
            for row in reader:
                if any(v not in (None, "") for v in row.values()):  # blank lines carry no example
                    yield reader.line_num, row
        except csv.Error as err:  # e.g. an unclosed quote running into a cell over the size limit
            raise DataError(f"{path}:{reader.line_num}: malformed {path.suffix[1:].upper()} ({err})") from None

    return columns, rows()


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold raw
    for line_no, line in enumerate(read_nonempty(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record


def require_column(column: str, columns: Iterable[str], option: str, where: str) -> None:
    columns = list(columns)
    if column not in columns:
        present = ", ".join(str(c) for c in columns) or "none"
        raise DataError(f"{where}: no column {column!r} (columns present: {present}); set {option}")


def preview(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
