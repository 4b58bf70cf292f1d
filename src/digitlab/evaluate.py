"""Accuracy, per-class precision/recall/F1, confusion matrix and the misclassified digits of a run.

`evaluate_predictions(probs, labels)` is pure; `evaluate_run(path, data)` loads and predicts first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from digitlab.calibration import calibrate_probs, save_calibration
from digitlab.data import DigitData, load_source
from digitlab.data.dataset import NUM_CLASSES
from digitlab.errors import DigitlabError
from digitlab.inference import ProbabilityModel, load_predictor, predict_proba

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMetrics:
    digit: int
    precision: float  # of the images predicted as `digit`, the share that are; 0 if none predicted
    recall: float  # of the images that are `digit`, the share predicted so
    f1: float
    support: int  # images whose true label is `digit`


@dataclass(frozen=True)
class Misclassified:
    index: int  # position in the evaluated data
    true: int
    predicted: int
    probability: float  # of the predicted digit
    top3: list[tuple[int, float]]  # (digit, probability), most likely first


@dataclass
class EvalResult:
    total: int
    correct: int
    accuracy: float
    mean_confidence: float  # mean probability of the predicted digit
    log_loss: float  # mean -log p(true digit), natural log
    per_class: list[ClassMetrics]
    confusion: np.ndarray  # (10, 10) int64: rows true digit, columns predicted digit
    misclassified: list[Misclassified]  # most confident mistakes first
    source: str = ""
    fingerprint: str = ""
    run: str = ""
    tta: bool = False
    seconds: float = 0.0  # prediction time
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.total - self.correct

    @property
    def macro_f1(self) -> float:
        return float(np.mean([c.f1 for c in self.per_class]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "tta": self.tta,
            "total": self.total,
            "correct": self.correct,
            "errors": self.errors,
            "accuracy": self.accuracy,
            "accuracy_95ci": list(wilson_interval(self.correct, self.total)),
            "mean_confidence": self.mean_confidence,
            "log_loss": self.log_loss,
            "macro_f1": self.macro_f1,
            "per_class": [vars(c) for c in self.per_class],
            "confusion": self.confusion.tolist(),
            "misclassified": [
                {"index": m.index, "true": m.true, "predicted": m.predicted, "probability": m.probability,
                 "top3": [{"digit": d, "probability": p} for d, p in m.top3]}
                for m in self.misclassified
            ],
            "seconds": self.seconds,
            **self.extra,
        }

    def to_text(self, max_mistakes: int = 20) -> str:
        """The human table `digitlab evaluate` prints."""
        lines = []
        if self.run:
            lines.append(f"run              {self.run}")
        lines.append(f"data             {self.source}  ({self.total:,} images, fingerprint {self.fingerprint})")
        if self.extra.get("data_choice"):
            lines.append(f"chosen           {self.extra['data_choice']}")
        seen = self.extra.get("seen_in_training")
        seen_text = ""
        if "seen_in_training" in self.extra:
            how = "counted" if self.extra.get("seen_included") else "left out"
            seen_text = "  seen in training: " + ("not checked" if seen is None else f"{seen:,} {how}")
        lines.append(f"accuracy         {100 * self.accuracy:.2f}%  ({self.errors:,} errors of {self.total:,})"
                     + ("  [test-time augmentation]" if self.tta else "") + seen_text)
        low, high = wilson_interval(self.correct, self.total)
        lines.append(f"95% interval     {100 * low:.2f}% .. {100 * high:.2f}%  (Wilson, {self.total:,} images)")
        if self.extra.get("expected_leaderboard"):
            lines.append(f"expected on unseen data like it (e.g. a Kaggle leaderboard): {100 * self.accuracy:.2f}% "
                         f"[{100 * low:.2f}%, {100 * high:.2f}%], from this held-out split")
        lines.append(f"mean confidence  {self.mean_confidence:.4f}")
        lines.append(f"log loss         {self.log_loss:.4f}")
        lines.append(f"macro F1         {self.macro_f1:.4f}")
        lines += ["", f"{'digit':>5}  {'precision':>9}  {'recall':>7}  {'f1':>7}  {'support':>7}"]
        for c in self.per_class:
            lines.append(f"{c.digit:>5}  {c.precision:>9.4f}  {c.recall:>7.4f}  {c.f1:>7.4f}  {c.support:>7,}")
        lines += ["", "confusion matrix (rows: true digit, columns: predicted)"]
        lines.append("      " + "".join(f"{d:>6}" for d in range(NUM_CLASSES)))
        for d, row in enumerate(self.confusion):
            lines.append(f"{d:>6}" + "".join(f"{n:>6}" for n in row))
        if self.misclassified:
            shown = self.misclassified[:max_mistakes]
            lines += ["", f"most confident mistakes ({len(shown)} of {len(self.misclassified)})"]
            lines.append(f"{'index':>7}  {'true':>4}  {'pred':>4}  {'p':>6}  top-3")
            for m in shown:
                tops = "  ".join(f"{d}:{p:.3f}" for d, p in m.top3)
                lines.append(f"{m.index:>7}  {m.true:>4}  {m.predicted:>4}  {m.probability:>6.3f}  {tops}")
        return "\n".join(lines)


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a proportion; stays inside [0, 1] even at 100%."""
    if total <= 0:
        raise DigitlabError("an interval needs at least one image")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise DigitlabError(f"expected probabilities of shape (N, {NUM_CLASSES}), got {probs.shape}")
    if labels.shape != (len(probs),):
        raise DigitlabError(f"{len(probs)} predictions but labels of shape {labels.shape}")
    if len(labels) == 0:
        raise DigitlabError("nothing to evaluate: no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DigitlabError(f"labels must be 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    return probs, labels.astype(np.int64)


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray) -> EvalResult:
    """Metrics for probabilities (N, 10) against true labels (N,); the prediction is the argmax."""
    probs, labels = _check(probs, labels)
    # argmax of the raw probabilities: rounding them first (as the seed notebook did) turns
    # every row without a p >= 0.5 into all zeros, whose argmax is 0, and miscounts
    predicted = probs.argmax(axis=1)
    confusion = np.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # zero where undefined (no images predicted / present), as sklearn's zero_division=0
        precision = np.where(predicted_count > 0, true_pos / predicted_count, 0.0)
        recall = np.where(support > 0, true_pos / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = [
        ClassMetrics(d, float(precision[d]), float(recall[d]), float(f1[d]), int(support[d]))
        for d in range(NUM_CLASSES)
    ]
    confidence = probs[np.arange(len(probs)), predicted]
    true_p = np.clip(probs[np.arange(len(probs)), labels], 1e-12, 1.0)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]  # most confident first, then by index
    top3 = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    misclassified = [
        Misclassified(int(i), int(labels[i]), int(predicted[i]), float(confidence[i]),
                      [(int(d), float(probs[i, d])) for d in top3[i]])
        for i in wrong
    ]
    correct = int(true_pos.sum())
    return EvalResult(
        total=len(labels),
        correct=correct,
        accuracy=correct / len(labels),
        mean_confidence=float(confidence.mean()),
        log_loss=float(-np.log(true_p).mean()),
        per_class=per_class,
        confusion=confusion.astype(np.int64),
        misclassified=misclassified,
    )


def evaluate_run(
    path: str | Path | ProbabilityModel, data: str | DigitData | None = None, tta: bool = False,
    precision: str = "auto", include_seen: bool = False, run_dir: str | Path | None = None,
    choice: str | None = None,
) -> EvalResult:
    """Evaluate a run folder, ensemble folder (members averaged) or loaded Predictor on labelled data.

    Images the run trained on are left out unless `include_seen` (the run's folder is `path`, or
    `run_dir` for a loaded Predictor). `data=None` picks the run's default evaluation set (see
    `digitlab.overlap.default_evaluation`): mnist:test for MNIST-trained runs, else its held-out split.
    `choice`: how a caller that ran `default_evaluation` itself got `data` (its second value).
    """
    from digitlab.overlap import HELD_OUT, check_seen, default_evaluation, run_train_hashes

    folder = Path(path) if isinstance(path, str | Path) else (Path(run_dir) if run_dir is not None else None)
    if data is None:
        if folder is None:
            raise DigitlabError("no data to evaluate on: name a source, or give the run folder for its default")
        data, choice = default_evaluation(folder)
    choice = choice or "named by the caller"
    held_out = HELD_OUT in choice
    data = load_source(data) if isinstance(data, str) else data
    data.require_labels("evaluation needs a labelled source "
                        "(e.g. mnist:test, Kaggle train.csv, images:DIR with class folders)")
    seen = check_seen(data, run_train_hashes(folder) if folder is not None else None, include_seen)
    measured = data if len(seen.keep) == len(data) else data.subset(seen.keep, data.source)
    # a folder is loaded here; anything else is taken as a loaded predictor (torch or ONNX Runtime)
    predictor = load_predictor(path, precision=precision) if isinstance(path, str | Path) else path
    t0 = time.perf_counter()
    probs = predict_proba(predictor, measured.images, tta)
    seconds = time.perf_counter() - t0
    result = evaluate_predictions(probs, measured.require_labels())
    # mistakes keep their index in the named source, not in the measured subset
    result.misclassified = [replace(m, index=int(seen.keep[m.index])) for m in result.misclassified]
    # the fingerprint of the images measured: with seen ones left out, not the named source's
    result.source, result.fingerprint, result.tta, result.seconds = data.source, measured.fingerprint, tta, seconds
    result.run = str(path) if isinstance(path, str | Path) else str(run_dir or "")
    notes = [seen.message] if seen.message else []
    applied = "calibration" in getattr(predictor, "meta", {})
    fitted_on = _calibration_source(folder) if folder is not None and applied else None
    if fitted_on == data.source and data.source.endswith("[val]"):  # as train calibrates: nothing else held out
        notes.append(f"the run's temperature was fitted on these validation images ({data.source}), as train "
                     "does: confidence and log-loss here are optimistic (accuracy is not affected)")
    elif fitted_on == data.source:
        notes.append(f"the run's temperature was fitted on {data.source} itself (digitlab calibrate --data): "
                     "confidence and log-loss here are optimistic (accuracy is not affected)")
    result.extra = {"members": predictor.members, "precision": predictor.precision,
                    "source_count": len(data), "data_choice": choice, **seen.to_dict(), "notes": notes}
    if held_out:  # the run's own held-out fold: the honest forecast for unseen data of the same kind
        low, high = wilson_interval(result.correct, result.total)
        result.extra["expected_leaderboard"] = {"accuracy": result.accuracy, "low95": low, "high95": high,
                                                "images": result.total, "method": "Wilson score interval"}
    for note in notes:  # the CLI prints them; a library caller finds them in extra["notes"]
        log.info("%s", note)
    log.info("%s on %s: accuracy %.4f in %.2fs", result.run, data.source, result.accuracy, seconds)
    return result


# ---------------------------------------------------------------- calibrating a run


def _calibration_source(run_dir: Path) -> str | None:
    from digitlab.calibration import load_calibration

    calibration = load_calibration(run_dir)
    return calibration.get("source") if calibration else None


def calibrate_run(run_dir: str | Path, data: str | None = None) -> dict[str, Any]:
    """Fit and store a run's (or ensemble's) temperature on its validation split, or on `data`.

    Without `data` the run's own validation split of its training source is rebuilt from its
    config (same seed, same fraction), so the temperature never sees the test set.
    """
    from digitlab.data import load_source
    from digitlab.overlap import check_seen, run_train_hashes, validation_data

    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir, precision="fp32", calibrated=False)
    seen_left_out = 0
    if data is not None:
        val = load_source(data)
        val.require_labels("calibration needs labels")
        # a temperature fitted on training images learns the run's over-confidence on them, not on new digits
        hashes = run_train_hashes(run_dir)
        try:
            seen = check_seen(val, hashes)
        except DigitlabError:
            raise DigitlabError(f"{data}: every image was in the run's training data; calibrate on held-out "
                                "images (default: the run's validation split)") from None
        seen_left_out = len(val) - len(seen.keep)
        if seen_left_out:
            val = val.subset(seen.keep, val.source)
        images, labels, source = val.images, val.require_labels(), data
    else:
        held_out = validation_data(run_dir)
        if held_out is None:
            raise DigitlabError(f"{run_dir}: the run kept no validation split; pass --data SOURCE (labelled, "
                                "never the test set you report on)")
        images, labels, source = held_out.images, held_out.require_labels(), held_out.source
    calibration = calibrate_probs(predictor.predict_proba(images), labels, source)
    calibration["seen_left_out"] = seen_left_out
    save_calibration(run_dir, calibration)
    return calibration
