"""Which evaluated images a run trained on, and which data set a run is measured on by default.

Kaggle's train.csv and test.csv are cut from MNIST's 70,000 images, so a model trained on one
source may have seen much of another; exact per-image hashes find those images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digitlab.checkpoint import read_model_meta, read_train_hashes
from digitlab.data import DigitData, load_source, split
from digitlab.errors import DigitlabError
from digitlab.rundir import ENSEMBLE_FILE, MODEL_META, require_model_folder

log = logging.getLogger(__name__)

MNIST_TEST = "mnist:test"
HELD_OUT = "held-out validation split"  # how `default_evaluation` names a run's own held-out data


def _ensemble_members(path: Path) -> list[Path] | None:
    manifest = path / ENSEMBLE_FILE
    if not manifest.is_file():
        return None
    try:
        return [path / name for name in json.loads(manifest.read_text())["members"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DigitlabError(f"{manifest}: corrupt ensemble manifest ({exc})") from None


def run_train_hashes(run_dir: str | Path) -> np.ndarray | None:
    """Hashes of every image a run (or any member of an ensemble) trained on; None if not recorded."""
    run_dir = Path(run_dir)
    members = _ensemble_members(run_dir)
    if members is None:
        return read_train_hashes(run_dir)
    own = read_train_hashes(run_dir)
    if own is not None:
        return own
    parts = [p for p in (read_train_hashes(m) for m in members) if p is not None]
    if not parts or len(parts) < len(members):
        return None
    return np.unique(np.concatenate(parts))


@dataclass(frozen=True)
class SeenCheck:
    """The outcome of comparing evaluated images with a run's training images."""

    total: int  # images in the evaluated source
    seen: int | None  # how many of them the run trained on; None: could not be checked
    included: bool  # whether the seen images stay in the metrics
    keep: np.ndarray  # indices into the source of the images that are measured

    @property
    def message(self) -> str | None:
        """One line for the user, or None when there was nothing to say."""
        if self.seen is None:
            return ("WARNING: overlap with the training data could not be checked (no record of the run's "
                    "training images: runs trained before digitlab kept one have none); the figures may "
                    "include training images")
        if self.seen == 0:
            return None
        if self.included:
            return (f"WARNING: {self.seen:,} of {self.total:,} images were in the training data and are COUNTED "
                    "(--include-seen): these figures overstate accuracy on unseen digits")
        return f"{self.seen:,} of {self.total:,} images were in the training data and are left out"

    def to_dict(self) -> dict[str, Any]:
        return {"seen_in_training": self.seen, "seen_included": self.included, "overlap_checked": self.seen is not None}


def check_seen(data: DigitData, train_hashes: np.ndarray | None, include_seen: bool = False) -> SeenCheck:
    """Find `data`'s images among `train_hashes`; by default keep only the unseen ones."""
    everything = np.arange(len(data))
    if train_hashes is None:
        return SeenCheck(len(data), None, True, everything)
    seen = np.isin(data.image_hashes(), train_hashes)
    count = int(seen.sum())
    if include_seen or count == 0:
        return SeenCheck(len(data), count, include_seen, everything)
    if count == len(data):
        raise DigitlabError(f"{data.source}: all {count:,} images were in the run's training data; evaluate "
                            "on another source, or pass --include-seen to measure them anyway")
    return SeenCheck(len(data), count, False, np.flatnonzero(~seen))


# ---------------------------------------------------------------- the default evaluation set


def trained_on_mnist(source: str) -> bool:
    """Whether a training source is MNIST's 60,000 training images (built-in or IDX files)."""
    kind, _, rest = source.partition(":")
    if kind == "mnist":
        return rest in ("", "train")
    return kind == "idx" and bool(rest) and not rest.endswith(":test")


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The training config in the run's (or first member's) model.json, with the fields this module
    reads checked: the file may have been edited by hand."""
    members = _ensemble_members(require_model_folder(run_dir))
    folder = members[0] if members else run_dir
    config = read_model_meta(folder).get("config") or {}
    problem = _config_problem(config)
    if problem:
        raise DigitlabError(f"{folder / MODEL_META}: config {problem}")
    return config


def _config_problem(config: Any) -> str | None:
    if not isinstance(config, dict):
        return f"must be an object, got {type(config).__name__}"
    for key in ("data", "val_data"):
        if config.get(key) is not None and not isinstance(config[key], str):
            return f"{key} must be a data source string, got {config[key]!r}"
    fraction = config.get("val_split", 0.0)
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 <= fraction < 1):
        return f"val_split must be a number in [0, 1), got {fraction!r}"
    for key in ("seed", "split_seed"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key} must be a whole number >= 0, got {value!r}"
    return None


def _split_seed(config: dict[str, Any]) -> int:
    """The seed a run's train/validation split was drawn with (see TrainConfig.split_seed)."""
    split_seed = config.get("split_seed")
    return int(config.get("seed", 0) if split_seed is None else split_seed)


def validation_key(run_dir: str | Path) -> tuple[Any, ...]:
    """What decides the images a run validated on: runs with equal keys held out the same images."""
    config = _run_config(Path(run_dir))
    if config.get("val_data"):
        return ("source", config["val_data"])
    fraction = float(config.get("val_split", 0.0) or 0.0)
    if fraction <= 0:
        return ("none",)
    return ("split", config.get("data", "mnist:train"), fraction, _split_seed(config))


def validation_data(run_dir: str | Path) -> DigitData | None:
    """The labelled data a run validated on: its `val_data` source, or its held-out split of
    `data` rebuilt from the config's fraction and seed (an ensemble: its first member's); None
    if it kept none."""
    config = _run_config(Path(run_dir))
    if config.get("val_data"):
        val = load_source(config["val_data"])
        val.require_labels("validation needs labels")
        return val
    fraction, seed = float(config.get("val_split", 0.0) or 0.0), _split_seed(config)
    if fraction <= 0:
        return None
    source = config.get("data", "mnist:train")
    data = load_source(source)
    _, val_idx = split(data.require_labels("cannot rebuild the run's validation split"), fraction, seed)
    return data.subset(val_idx, f"{source}[val]")


def default_evaluation(run_dir: str | Path) -> tuple[DigitData, str]:
    """The data a run is measured on when none is named, and one line saying why.

    MNIST-trained: mnist:test. Anything else: its own validation source or held-out split,
    rebuilt from the config's seed (an ensemble: its first member's; images other members
    trained on are then left out by `check_seen`).
    """
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    source = config.get("data", "mnist:train")
    if trained_on_mnist(source):
        return load_source(MNIST_TEST), f"default for a run trained on MNIST's training set ({source})"
    val = validation_data(run_dir)
    if val is not None and config.get("val_data"):
        return val, f"default: the run's validation source (trained on {source})"
    if val is not None:
        fraction, seed = float(config["val_split"]), _split_seed(config)
        return val, (f"default: the run's {HELD_OUT} of {source} "
                     f"(val_split {fraction:g}, seed {seed}), rebuilt from its config")
    return load_source(MNIST_TEST), (f"default: the run kept no validation data from {source}, so {MNIST_TEST}; "
                                     "images it trained on are left out")


# ---------------------------------------------------------------- two sources


def source_overlap(a: DigitData, b: DigitData) -> dict[str, Any]:
    """Exact duplicates between two sources: images of `a` found in `b` and vice versa, and
    how many of the shared images carry different labels (when both are labelled)."""
    ha, hb = a.image_hashes(), b.image_hashes()
    in_b = np.isin(ha, hb)
    in_a = np.isin(hb, ha)
    shared = np.intersect1d(ha, hb)
    out: dict[str, Any] = {
        "a": a.source, "b": b.source, "a_count": len(a), "b_count": len(b),
        "a_in_b": int(in_b.sum()), "b_in_a": int(in_a.sum()), "distinct_shared": len(shared),
        "label_disagreements": None,
    }
    if a.labels is not None and b.labels is not None and len(shared):
        # a pair (image of a, image of b) with equal pixels but different labels; each image of `a`
        # is compared with every copy in `b`, so duplicates inside one source are counted honestly
        order = np.argsort(hb, kind="stable")
        hb_sorted, lb_sorted = hb[order], b.labels[order]
        idx_a = np.flatnonzero(in_b)
        lo = np.searchsorted(hb_sorted, ha[idx_a], side="left")
        hi = np.searchsorted(hb_sorted, ha[idx_a], side="right")
        disagree = 0
        for i, start, stop in zip(idx_a, lo, hi, strict=True):
            if np.any(lb_sorted[start:stop] != a.labels[i]):
                disagree += 1
        out["label_disagreements"] = disagree
    return out
