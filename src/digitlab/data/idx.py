"""Read and write the IDX format of the official MNIST files (gzip or raw).

Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension; the data follows in C order.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

from digitlab.data.dataset import DigitData
from digitlab.errors import DigitlabError, missing

_UINT8 = 0x08
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


# The largest payload a header may declare: 1 GiB holds EMNIST's biggest split (550 MB)
# twice over, and a header that declares more is a damaged or hostile file.
MAX_IDX_BYTES = 1 << 30
_CHUNK = 1 << 20


def _parse_header(head: bytes, name: str) -> tuple[int, ...]:
    """The shape declared by an IDX header (`head` must be the first 4 + 4*ndim bytes or more)."""
    if len(head) < 4:
        raise DigitlabError(f"{name}: file too short for an IDX header ({len(head)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype_code != _UINT8 or not 1 <= ndim <= 4:
        raise DigitlabError(
            f"{name}: wrong IDX magic {head[:4].hex()} (expected 0000 08 01..04: "
            "unsigned-byte data with 1 to 4 dimensions)"
        )
    if len(head) < 4 + 4 * ndim:
        raise DigitlabError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    declared = math.prod(shape)  # Python ints: np.prod wraps to 0 past 2**63
    if declared > MAX_IDX_BYTES:
        raise DigitlabError(
            f"{name}: IDX header declares shape {shape} = {declared} bytes, more than the "
            f"{MAX_IDX_BYTES >> 20} MiB limit (damaged file?)"
        )
    return shape


def _size_error(name: str, shape: tuple[int, ...], found: int | None, trailing: bool) -> DigitlabError:
    what = "has trailing bytes" if trailing else "truncated"
    return DigitlabError(
        f"{name}: IDX file {what}: header declares shape {shape} = {math.prod(shape)} bytes, "
        f"found {'more' if found is None else found}"
    )


def _read_stream(fh: BinaryIO, name: str) -> np.ndarray:
    """Read one IDX file from a stream, never holding more than the header declares (+1 byte)."""
    head = fh.read(4)
    if len(head) == 4:
        head += fh.read(4 * head[3])
    shape = _parse_header(head, name)
    expected = math.prod(shape)
    buffer = bytearray()
    while len(buffer) < expected:
        chunk = fh.read(min(_CHUNK, expected - len(buffer)))
        if not chunk:
            raise _size_error(name, shape, len(buffer), trailing=False)
        buffer += chunk
    extra = fh.read(_CHUNK)  # bounded: count a few trailing bytes exactly, never inflate a bomb
    if extra:
        found = len(buffer) + len(extra) if len(extra) < _CHUNK and not fh.read(1) else None
        raise _size_error(name, shape, found, trailing=True)
    return np.frombuffer(buffer, dtype=np.uint8).reshape(shape).copy()


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX blob into a uint8 array of the shape its header declares."""
    return _read_stream(io.BytesIO(data), name)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzip-compressed IDX file; gzip is inflated as a stream and stops at the
    size the header declares, so a small compressed bomb cannot fill the memory."""
    path = Path(path)
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not gzipped:
                return _read_stream(raw, str(path))
            with gzip.GzipFile(fileobj=raw) as fh:
                return _read_stream(cast(BinaryIO, fh), str(path))
    except FileNotFoundError:
        raise DigitlabError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DigitlabError(f"{path}: a directory, expected an IDX file") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DigitlabError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    except OSError as exc:
        raise DigitlabError(f"{path}: cannot read ({exc.strerror or exc})") from None


def idx_header(shape: tuple[int, ...]) -> bytes:
    """The IDX header of a uint8 array of `shape`: magic (0, 0, type, ndim), then each dimension."""
    return struct.pack(">HBB", 0, _UINT8, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def encode_idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return idx_header(array.shape) + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write one IDX file, gzip-compressed when the name ends in .gz."""
    path = Path(path)
    blob = encode_idx(array)
    if path.suffix == ".gz":
        blob = gzip.compress(blob, mtime=0)
    path.write_bytes(blob)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    # Some mirrors ship `train-images.idx3-ubyte`: accept a dot instead of the dash.
    dotted = stem.replace("-idx", ".idx")
    for candidate in (directory / dotted, directory / f"{dotted}.gz"):
        if candidate.is_file():
            return candidate
    raise DigitlabError(f"{directory}: no {stem} or {stem}.gz file")


def load_idx_dir(directory: str | Path, split: str = "train") -> DigitData:
    """Load the images and labels of one split ('train' or 'test') from a folder of IDX files."""
    directory = Path(directory)
    if split not in IMAGE_FILES:
        raise DigitlabError(f"idx split must be 'train' or 'test', got {split!r}")
    if not directory.is_dir():
        raise missing(directory, "a folder holding the IDX files", folder=True)
    images_path = _find(directory, IMAGE_FILES[split])
    labels_path = _find(directory, LABEL_FILES[split])
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DigitlabError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1:
        raise DigitlabError(f"{labels_path}: expected a 1-D label file, got shape {labels.shape}")
    if len(images) == 0:
        raise DigitlabError(f"{images_path}: holds 0 images, expected at least one")
    if len(images) != len(labels):
        raise DigitlabError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if labels.size and labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DigitlabError(f"{labels_path}: record {bad}: label {labels[bad]} outside 0..9")
    return DigitData(images, labels.astype(np.int64), f"idx:{directory}:{split}")


def write_idx_dir(
    directory: str | Path, data: DigitData, split: str = "train", gz: bool = True
) -> list[Path]:
    """Write `data` as the official pair of files for `split`; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    images_path = directory / f"{IMAGE_FILES[split]}{suffix}"
    write_idx(images_path, data.images)
    written = [images_path]
    if data.labels is not None:
        labels_path = directory / f"{LABEL_FILES[split]}{suffix}"
        write_idx(labels_path, data.labels.astype(np.uint8))
        written.append(labels_path)
    return written
