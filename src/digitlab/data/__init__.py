"""Data sources, each named by one string: `mnist[:train|:test]`, `idx:DIR[:test]`,
`kaggle:PATH`, `images:DIR`. Every source yields a `DigitData`.
"""

from __future__ import annotations

from pathlib import Path

from digitlab.data.dataset import IMAGE_SIDE, NUM_CLASSES, DigitData, fingerprint, image_hashes
from digitlab.data.idx import load_idx_dir, read_idx, write_idx, write_idx_dir
from digitlab.data.images import load_image_folder
from digitlab.data.kaggle import load_kaggle_csv, write_kaggle_csv
from digitlab.data.offline import load_mnist_arrays
from digitlab.data.split import split
from digitlab.errors import DigitlabError

SOURCE_FORMS = (
    "mnist",
    "mnist:train",
    "mnist:test",
    "idx:DIR",
    "idx:DIR:test",
    "kaggle:PATH",
    "images:DIR",
)

__all__ = [
    "IMAGE_SIDE",
    "NUM_CLASSES",
    "SOURCE_FORMS",
    "DigitData",
    "fingerprint",
    "image_hashes",
    "load_idx_dir",
    "load_image_folder",
    "load_kaggle_csv",
    "load_mnist",
    "load_source",
    "read_idx",
    "split",
    "write_idx",
    "write_idx_dir",
    "write_kaggle_csv",
]


def load_mnist(part: str = "train") -> DigitData:
    if part not in ("train", "test"):
        raise DigitlabError(f"mnist part must be 'train' or 'test', got {part!r}")
    arrays = load_mnist_arrays()
    return DigitData(arrays[f"{part}_images"], arrays[f"{part}_labels"], f"mnist:{part}")


def load_source(spec: str) -> DigitData:
    """Resolve a source string (see SOURCE_FORMS) into images and labels."""
    kind, _, rest = spec.partition(":")
    if kind == "mnist":
        return load_mnist(rest or "train")
    if kind == "idx" and rest:
        directory, part = rest, "train"
        head, sep, tail = rest.rpartition(":")
        if sep and tail in ("train", "test"):
            directory, part = head, tail
        return load_idx_dir(Path(directory), part)
    if kind == "kaggle" and rest:
        return load_kaggle_csv(Path(rest))
    if kind == "images" and rest:
        return load_image_folder(Path(rest))
    if kind in ("idx", "kaggle", "images") and not rest:
        what = "PATH" if kind == "kaggle" else "DIR"
        raise DigitlabError(f"data source {spec!r} has no path; write it as {kind}:{what}")
    raise DigitlabError(
        f"unknown data source {spec!r}; expected one of: {', '.join(SOURCE_FORMS)}"
    )
