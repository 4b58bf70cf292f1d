"""Data sources, each named by one string: `mnist[:train|:test]`, `idx:DIR[:test]`,
`kaggle:PATH`, `images:DIR`. Every source yields a `DigitData`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from digitlab.data.dataset import IMAGE_SIDE, NUM_CLASSES, DigitData, fingerprint, image_hashes
from digitlab.data.split import split  # eager: a lazily imported submodule would shadow the function
from digitlab.errors import DigitlabError

# Readers load on first use: the server, which reads no CSV, then never imports pyarrow.
_LAZY = {
    "load_idx_dir": "idx", "read_idx": "idx", "write_idx": "idx", "write_idx_dir": "idx",
    "load_image_folder": "preprocess",
    "load_kaggle_csv": "kaggle", "write_kaggle_csv": "kaggle",
    "load_mnist_arrays": "offline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"digitlab.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    from digitlab.data.offline import load_mnist_arrays

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
        return __getattr__("load_idx_dir")(Path(directory), part)
    if kind == "kaggle" and rest:
        return __getattr__("load_kaggle_csv")(Path(rest))
    if kind == "images" and rest:
        return __getattr__("load_image_folder")(Path(rest))
    if kind in ("idx", "kaggle", "images") and not rest:
        what = "PATH" if kind == "kaggle" else "DIR"
        raise DigitlabError(f"data source {spec!r} has no path; write it as {kind}:{what}")
    raise DigitlabError(
        f"unknown data source {spec!r}; expected one of: {', '.join(SOURCE_FORMS)}"
    )
