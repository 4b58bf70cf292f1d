"""Kaggle "Digit Recognizer" CSV: train.csv (label,pixel0..pixel783) and test.csv (pixels only).

The fast path parses with pyarrow; when anything is wrong, a slow diagnostic pass finds
the first bad line so the error names it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from digitlab.data.dataset import DigitData
from digitlab.errors import DigitlabError, missing

PIXEL_COLUMNS = [f"pixel{i}" for i in range(784)]
TRAIN_HEADER = ["label", *PIXEL_COLUMNS]
# What pyarrow's int64 parser takes: ASCII digits, an optional minus, spaces/tabs around, and
# also hexadecimal ("0x5", "0XFF"), which `_has_hex` sends to the diagnostic pass instead.
# Python's int() also takes "+5", "1_0" and non-ASCII digits, which pyarrow refuses.
_INTEGER = re.compile(r"[ \t]*-?[0-9]+[ \t]*")
_LINE_END = re.compile(rb"\r\n?|\n")
_HEX_MARK = re.compile(rb"[xX]")


def _check_header(path: Path, header: list[str]) -> bool:
    """Return True when the file has a label column; raise if the header is not Kaggle's."""
    header = [h.strip().strip('"') for h in header]
    if header == TRAIN_HEADER:
        return True
    if header == PIXEL_COLUMNS:
        return False
    if header and header[0] == "label" and len(header) != 785:
        raise DigitlabError(
            f"{path}: line 1: header has {len(header)} columns, expected 785 (label,pixel0..pixel783)"
        )
    if len(header) not in (784, 785):
        raise DigitlabError(
            f"{path}: line 1: header has {len(header)} columns, expected Kaggle's "
            "label,pixel0..pixel783 (train) or pixel0..pixel783 (test)"
        )
    expected = TRAIN_HEADER if len(header) == 785 else PIXEL_COLUMNS
    wrong = next(i for i, (a, b) in enumerate(zip(header, expected, strict=True)) if a != b)
    raise DigitlabError(
        f"{path}: line 1: column {wrong + 1} is named {header[wrong]!r}, expected {expected[wrong]!r} "
        "(not a Kaggle Digit Recognizer header)"
    )


def _has_hex(path: Path) -> bool:
    """An x or X anywhere after the header ("pixel0,..."): pyarrow would read a cell "0x5" as 5, silently."""
    with path.open("rb") as fh:
        chunk = fh.read(1 << 24)
        header_end = _LINE_END.search(chunk)  # \n, \r\n or a bare \r, as pyarrow accepts
        chunk = chunk[header_end.end() :] if header_end else b""
        while chunk:
            if _HEX_MARK.search(chunk):
                return True
            chunk = fh.read(1 << 24)
    return False


def _rows(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) pairs of a csv.reader, its first row (the header) skipped."""
    next(reader, None)
    for row in reader:
        yield reader.line_num, row


def _diagnose(path: Path, has_label: bool) -> DigitlabError:
    """Scan the file line by line to name the first bad cell (only runs after a failure).

    Every line-numbered message comes from here: pyarrow skips blank lines, so its row
    numbers are not file lines.
    """
    width = 785 if has_label else 784
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        try:
            return _first_bad_row(path, _rows(reader), width, has_label)
        except csv.Error as exc:  # a field over csv's 128 KB limit, a NUL byte...
            return DigitlabError(f"{path}: line {reader.line_num}: not a valid CSV line ({exc})")


def _first_bad_row(
    path: Path, rows: Iterator[tuple[int, list[str]]], width: int, has_label: bool
) -> DigitlabError:
    for line, row in rows:
        if not row:
            continue
        if len(row) != width:
            return DigitlabError(
                f"{path}: line {line}: {len(row)} columns, expected {width}"
            )
        for col, cell in enumerate(row):
            name = "label" if has_label and col == 0 else PIXEL_COLUMNS[col - has_label]
            if not cell.strip():
                return DigitlabError(f"{path}: line {line}: {name} is empty, expected an integer")
            if not _INTEGER.fullmatch(cell):
                return DigitlabError(
                    f"{path}: line {line}: {name} is {cell!r}, expected an integer"
                )
            value = int(cell)
            if name == "label" and not 0 <= value <= 9:
                return DigitlabError(f"{path}: line {line}: label {value} outside 0..9")
            if name != "label" and not 0 <= value <= 255:
                return DigitlabError(f"{path}: line {line}: {name} is {value}, outside 0..255")
    return DigitlabError(f"{path}: could not parse as a Kaggle CSV")


def load_kaggle_csv(path: str | Path, expect_labels: bool | None = None) -> DigitData:
    """Read train.csv or test.csv; `expect_labels` True/False insists on one kind."""
    path = Path(path)
    if not path.is_file():
        raise missing(path, "a Kaggle CSV file (train.csv or test.csv)", folder=False)
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
    except UnicodeDecodeError:
        raise DigitlabError(f"{path}: not a text file, expected a Kaggle CSV") from None
    if not first.strip():
        raise DigitlabError(f"{path}: empty file, expected a Kaggle CSV with a header line")
    try:
        header = next(csv.reader([first]))
    except csv.Error as exc:
        raise DigitlabError(f"{path}: line 1: not a valid CSV header ({exc})") from None
    has_label = _check_header(path, header)
    if expect_labels is True and not has_label:
        raise DigitlabError(f"{path}: has no label column, expected a labelled train.csv")
    if expect_labels is False and has_label:
        raise DigitlabError(f"{path}: has a label column, expected pixels only (test.csv form)")
    names = TRAIN_HEADER if has_label else PIXEL_COLUMNS
    try:
        table = pacsv.read_csv(
            path,
            # The checked header is replaced by the canonical names: the column types are keyed
            # on them, and a header written `label, pixel0, ...` would otherwise leave the types
            # to pyarrow's guess (floats truncated, text columns).
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.int64() for name in names}),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):
        raise _diagnose(path, has_label) from None
    if table.num_rows == 0:
        raise DigitlabError(f"{path}: header only, no data rows")
    if any(table.column(i).null_count for i in range(table.num_columns)) or _has_hex(path):
        raise _diagnose(path, has_label)  # empty cells (or "NA"), which pyarrow reads as null; hex
    array = np.column_stack([table.column(i).to_numpy() for i in range(table.num_columns)])
    if has_label:
        labels, pixels = array[:, 0], array[:, 1:]
    else:
        labels, pixels = None, array
    if pixels.min() < 0 or pixels.max() > 255 or (
        labels is not None and (labels.min() < 0 or labels.max() > 9)
    ):
        raise _diagnose(path, has_label)
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return DigitData(images, None if labels is None else labels.astype(np.int64), f"kaggle:{path}")


def write_kaggle_csv(path: str | Path, data: DigitData, with_labels: bool | None = None) -> Path:
    """Write train.csv (labels first) or test.csv form; `with_labels=None` follows the data."""
    path = Path(path)
    with_labels = data.has_labels if with_labels is None else with_labels
    if with_labels and data.labels is None:
        raise DigitlabError(f"{data.source}: has no labels to write")
    pixels = data.images.reshape(len(data), 784).astype(np.int64)
    columns = [pa.array(pixels[:, i]) for i in range(784)]
    names = list(PIXEL_COLUMNS)
    if with_labels:
        columns.insert(0, pa.array(data.labels))
        names.insert(0, "label")
    # The header is written by hand: pyarrow quotes header names even with quoting "none",
    # and Kaggle's own files have a bare `label,pixel0,...` line.
    with path.open("wb") as fh:
        fh.write((",".join(names) + "\n").encode("ascii"))
        pacsv.write_csv(
            pa.Table.from_arrays(columns, names=names),
            fh,
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"),
        )
    return path
