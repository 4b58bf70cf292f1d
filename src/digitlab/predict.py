"""Inputs (Kaggle test.csv, IDX, .npy, PNG/JPEG files or folders) -> probabilities -> predictions.

Also a validated Kaggle submission.csv writer (test-time augmentation lives in `inference`).
One bad input is reported and skipped; the others are still predicted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from digitlab.abstain import abstain_reasons, min_confidence
from digitlab.calibration import DEFAULT_MIN_CONFIDENCE
from digitlab.checkpoint import atomic_write_bytes
from digitlab.data.idx import read_idx
from digitlab.data.images import IMAGE_SUFFIXES
from digitlab.data.kaggle import load_kaggle_csv
from digitlab.data.preprocess import load_image_file
from digitlab.errors import DigitlabError
from digitlab.export import open_predictor
from digitlab.inference import ProbabilityModel, predict_proba
from digitlab.pixels import PIXELS, as_uint8_images, unit_scaled

log = logging.getLogger(__name__)

FORMATS = ("csv", "json", "kaggle")
SUBMISSION_HEADER = ("ImageId", "Label")

# ---------------------------------------------------------------- reading inputs


@dataclass
class InputBatch:
    """The images of one input argument, each with a name saying where it came from."""

    source: str  # the input as given
    kind: str  # "kaggle", "idx", "npy", "image"
    images: np.ndarray  # (N, 28, 28) uint8
    names: list[str]


@dataclass
class Prediction:
    source: str  # file, or file#row for multi-image files (row 1-based)
    digit: int  # the most likely digit (the word the HTTP API uses too)
    probability: float
    top_k: list[tuple[int, float]]  # (digit, probability), most likely first
    seen_in_training: bool | None = None  # the image is one the run trained on; None: not known
    uncertain: bool = False  # do not trust `digit`: see `reason` (digitlab.abstain)
    reason: str | None = None  # too little ink, not digit-shaped, several digits, low confidence

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_k"] = [{"digit": k, "probability": p} for k, p in self.top_k]
        return d


@dataclass
class PredictionResult:
    predictions: list[Prediction]
    errors: list[str] = field(default_factory=list)  # one line per input that could not be read
    notes: list[str] = field(default_factory=list)  # things the user should know, not failures
    batches: list[InputBatch] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.errors


def _is_idx(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(("-ubyte", ".idx")) or "idx1" in name or "idx3" in name


def _as_images(array: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """An array file's images as uint8 (N, 28, 28) (floats within [0, 1]: scaled by 255, and said so)."""
    images = as_uint8_images(array, str(path))
    if len(images) == 0:
        raise DigitlabError(f"{path}: holds 0 images, expected at least one")
    if unit_scaled(array):
        notes.append(f"{path}: float values all within [0, 1], read as scaled to [0, 1] (multiplied by 255)")
    return images


def _check_npy_header(path: Path) -> None:
    """Refuse a .npy file by its header, before numpy allocates what the header claims
    (a 60-byte header can ask for terabytes)."""
    with path.open("rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            raise DigitlabError(f"{path}: an .npz archive, expected one .npy array")
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:  # 3.0 exists only for structured dtypes, which are not pixels either
                raise DigitlabError(f"{path}: .npy format version {version[0]}.{version[1]}, "
                                    "expected 1.0 or 2.0 (as numpy.save writes)")
        except ValueError as exc:
            raise DigitlabError(f"{path}: not a .npy file, expected one written by numpy.save ({exc})") from None
        data_bytes = path.stat().st_size - fh.tell()
    if dtype.hasobject:
        raise DigitlabError(f"{path}: holds pickled Python objects, expected numbers in 0..255")
    if dtype.kind not in "iuf":  # the kinds as_uint8_images takes
        raise DigitlabError(f"{path}: holds values of type {dtype}, expected numbers in 0..255")
    images = shape in ((PIXELS,), (28, 28)) or (len(shape) == 2 and shape[1] == PIXELS) or (
        len(shape) == 3 and shape[1:] == (28, 28))
    if not images:
        per_image = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
        raise DigitlabError(f"{path}: got shape {list(shape)} ({per_image} pixels per image), expected "
                            f"(N, 28, 28) or (N, {PIXELS})")
    needed = math.prod(shape) * dtype.itemsize
    if needed > data_bytes:
        raise DigitlabError(f"{path}: header says shape {list(shape)} ({needed:,} bytes of {dtype}) but "
                            f"only {data_bytes:,} bytes follow (truncated or not written by numpy.save)")


def _load_npy(path: Path, notes: list[str]) -> np.ndarray:
    try:
        _check_npy_header(path)
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # a header numpy reads differently from read_array_header
        raise DigitlabError(f"{path}: not a plain .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DigitlabError(f"{path}: cannot read .npy file ({exc})") from None
    return _as_images(array, path, notes)


def _load_idx(path: Path, notes: list[str]) -> np.ndarray:
    array = read_idx(path)
    if array.ndim == 1:
        raise DigitlabError(f"{path}: an IDX label file (1-D, {len(array)} values), expected images")
    return _as_images(array, path, notes)


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DigitlabError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files


def read_inputs(inputs: Iterable[str | Path]) -> tuple[list[InputBatch], list[str], list[str]]:
    """Read every input; returns (batches, errors, notes). A bad file becomes an error line, not a stop."""
    batches: list[InputBatch] = []
    errors: list[str] = []
    notes: list[str] = []

    def attempt(source: str, kind: str, load) -> None:
        try:
            images = load()
        except DigitlabError as exc:
            errors.append(str(exc))
            return
        except (OSError, ValueError, EOFError, MemoryError) as exc:
            # A decoder failing in a way the readers did not foresee: still one input's problem,
            # and the other inputs are predicted.
            log.debug("%s: reading failed", source, exc_info=True)
            detail = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
            errors.append(f"{source}: cannot read ({detail})")
            return
        names = [source] if kind == "image" else [f"{source}#{i + 1}" for i in range(len(images))]
        batches.append(InputBatch(source, kind, images, names))

    for given in inputs:
        text = str(given)
        if text.startswith("kaggle:"):
            text = text[len("kaggle:") :]
            kind = "kaggle"
        else:
            kind = ""
        path = Path(text)
        if path.is_dir() and kind != "kaggle":
            try:
                files = _folder_files(path)
            except DigitlabError as exc:
                errors.append(str(exc))
                continue
            for file in files:
                attempt(str(file), "image", lambda f=file: load_image_file(f)[None])
            continue
        if not path.exists():
            errors.append(f"{path}: no such file or directory")
            continue
        suffix = path.suffix.lower()
        if kind == "kaggle" or suffix == ".csv":
            def load_csv(path: Path = path) -> np.ndarray:
                data = load_kaggle_csv(path)
                if data.has_labels:
                    notes.append(f"{path}: has a label column (train.csv form); labels ignored")
                return data.images

            attempt(str(path), "kaggle", load_csv)
        elif suffix == ".npy":
            attempt(str(path), "npy", lambda p=path: _load_npy(p, notes))
        elif _is_idx(path):
            attempt(str(path), "idx", lambda p=path: _load_idx(p, notes))
        else:  # anything else is tried as an image; PIL tells if it is not one
            attempt(str(path), "image", lambda p=path: load_image_file(p)[None])
    return batches, errors, notes


# ---------------------------------------------------------------- predicting


def top_k(probs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per row: the k most likely (digit, probability), highest first (ties: lower digit first)."""
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(d), float(p[d])) for d in row] for row, p in zip(order, probs, strict=True)]


def predictions_from_proba(probs: np.ndarray, names: Sequence[str], k: int = 3,
                           images: np.ndarray | None = None,
                           min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[Prediction]:
    """With `images` (what the model saw) each prediction also says whether to trust it."""
    labels = probs.argmax(axis=1)
    reasons = abstain_reasons(images, probs, min_confidence) if images is not None else [None] * len(probs)
    return [
        Prediction(name, int(label), float(p[label]), tops, uncertain=reason is not None, reason=reason)
        for name, label, p, tops, reason in zip(names, labels, probs, top_k(probs, k), reasons, strict=True)
    ]


def predict_inputs(
    run: str | Path | ProbabilityModel,
    inputs: Iterable[str | Path],
    top_k: int = 3,
    tta: bool = False,
    batch_size: int | None = None,
    backend: str = "torch",
    precision: str = "auto",
) -> PredictionResult:
    """Predict every image of every input with a run folder, ensemble folder or loaded Predictor.

    backend="onnx" runs a folder's model in ONNX Runtime (see digitlab.export).
    """
    predictor = open_predictor(run, backend=backend, precision=precision) if isinstance(run, str | Path) else run
    if batch_size is not None:
        predictor.batch_size = batch_size
    batches, errors, notes = read_inputs(inputs)
    predictions: list[Prediction] = []
    if batches:
        images = np.concatenate([b.images for b in batches])
        names = [n for b in batches for n in b.names]
        probs = predict_proba(predictor, images, tta)
        predictions = predictions_from_proba(probs, names, top_k, images, min_confidence(predictor.meta))
        if isinstance(run, str | Path) and Path(run).is_dir():
            _mark_seen(predictions, images, Path(run), notes)
    log.info("predicted %d images from %d inputs (%d errors)", len(predictions), len(batches), len(errors))
    return PredictionResult(predictions, errors, notes, batches)


def _mark_seen(predictions: list[Prediction], images: np.ndarray, run_dir: Path, notes: list[str]) -> None:
    """Flag the images the run trained on: its answers there are recall, not prediction."""
    from digitlab.data import image_hashes
    from digitlab.overlap import run_train_hashes

    train_hashes = run_train_hashes(run_dir)
    if train_hashes is None:
        return
    seen = np.isin(image_hashes(images), train_hashes)
    for prediction, flag in zip(predictions, seen, strict=True):
        prediction.seen_in_training = bool(flag)
    if seen.any():
        notes.append(f"{int(seen.sum()):,} of {len(seen):,} images were in the training data "
                     "(seen_in_training in --format json); predictions on them say little about new digits")


# ---------------------------------------------------------------- writing


def predictions_csv(predictions: Sequence[Prediction]) -> str:
    """source,digit,probability,top_k,uncertain,reason; top_k as 'digit:probability' pairs, space-separated."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["source", "digit", "probability", "top_k", "uncertain", "reason"])
    for p in predictions:
        tops = " ".join(f"{d}:{q:.4f}" for d, q in p.top_k)
        writer.writerow([p.source, p.digit, f"{p.probability:.4f}", tops, str(p.uncertain).lower(),
                         p.reason or ""])
    return out.getvalue()


def predictions_json(predictions: Sequence[Prediction]) -> str:
    return json.dumps([p.to_dict() for p in predictions], indent=2) + "\n"


def validate_submission(ids: np.ndarray, labels: np.ndarray, expected_rows: int) -> None:
    """Kaggle's rules: one row per test image, ImageId 1..N in order, Label an integer 0..9."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    if len(ids) != expected_rows or len(labels) != expected_rows:
        raise DigitlabError(f"submission has {len(labels)} rows, expected {expected_rows} (one per test image)")
    if not np.array_equal(ids, np.arange(1, expected_rows + 1)):
        bad = int(np.flatnonzero(ids != np.arange(1, expected_rows + 1))[0])
        raise DigitlabError(f"submission row {bad + 1}: ImageId {ids[bad]}, expected {bad + 1}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DigitlabError("submission labels must be integers 0..9")


def submission_csv(labels: Sequence[int] | np.ndarray, expected_rows: int) -> str:
    labels = np.asarray(labels)
    ids = np.arange(1, len(labels) + 1)
    validate_submission(ids, labels, expected_rows)
    rows = "".join(f"{i},{int(label)}\n" for i, label in zip(ids, labels, strict=True))
    return ",".join(SUBMISSION_HEADER) + "\n" + rows


def read_submission(path: str | Path, expected_rows: int | None = None) -> np.ndarray:
    """Read back and check a submission.csv; returns its labels (tests, and before uploading)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != ",".join(SUBMISSION_HEADER):
        raise DigitlabError(f"{path}: line 1: header must be {','.join(SUBMISSION_HEADER)}")
    ids, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        try:
            a, b = line.split(",")
            ids.append(int(a))
            labels.append(int(b))
        except ValueError:
            raise DigitlabError(f"{path}: line {number}: {line!r}, expected ImageId,Label integers") from None
    validate_submission(np.array(ids), np.array(labels), len(ids) if expected_rows is None else expected_rows)
    return np.array(labels)


def render(result: PredictionResult, fmt: str) -> str:
    """The text of the output file in `fmt` (csv, json or kaggle)."""
    if fmt == "csv":
        return predictions_csv(result.predictions)
    if fmt == "json":
        return predictions_json(result.predictions)
    if fmt == "kaggle":
        if len(result.batches) != 1 or result.batches[0].kind != "kaggle" or result.errors:
            raise DigitlabError("--format kaggle needs exactly one readable Kaggle test.csv input")
        return submission_csv([p.digit for p in result.predictions], len(result.batches[0].images))
    raise DigitlabError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_output(text: str, path: str | Path) -> Path:
    """Atomic: an interrupted run never leaves a half-written submission behind."""
    path = Path(path)
    atomic_write_bytes(path, text.encode())
    return path
