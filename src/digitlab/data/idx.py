"""Read and write the IDX format of the official MNIST files (gzip or raw).

Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension; the data follows in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from digitlab.data.dataset import DigitData
from digitlab.errors import DigitlabError

_UINT8 = 0x08
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DigitlabError(f"{path}: no such file") from None
    except OSError as exc:
        raise DigitlabError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DigitlabError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX blob into a uint8 array of the shape its header declares."""
    if len(data) < 4:
        raise DigitlabError(f"{name}: file too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _UINT8 or not 1 <= ndim <= 4:
        raise DigitlabError(
            f"{name}: wrong IDX magic {data[:4].hex()} (expected 0000 08 01..04: "
            "unsigned-byte data with 1 to 4 dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DigitlabError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DigitlabError(
            f"{name}: IDX file {what}: header declares shape {shape} = {expected} bytes, "
            f"found {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _UINT8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


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
        raise DigitlabError(f"{directory}: no such directory")
    images_path = _find(directory, IMAGE_FILES[split])
    labels_path = _find(directory, LABEL_FILES[split])
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DigitlabError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1:
        raise DigitlabError(f"{labels_path}: expected a 1-D label file, got shape {labels.shape}")
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
