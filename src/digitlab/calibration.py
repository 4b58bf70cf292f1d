"""Temperature scaling: make a run's probabilities mean what they say.

One scalar T, fitted on held-out (validation) data by minimising the negative log-likelihood
of softmax(log p / T) (Guo et al. 2017). Dividing log-probabilities rather than logits lets
one rule serve single models (where it equals logits / T) and ensembles (mean of members).
The result lives in RUN_DIR/calibration.json; `digitlab.inference` applies it on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from digitlab.errors import DigitlabError
from digitlab.rundir import atomic_write_json

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15  # Guo et al.'s choice; fewer bins hide miscalibration, more are noisy on 6k images
# Below this calibrated top probability a prediction counts as unsure. Chosen per run on its
# validation split (see `confidence_threshold`); this is the fallback for runs never calibrated.
DEFAULT_MIN_CONFIDENCE = 0.5
VAL_FLAG_RATE = 0.003  # the share of validation digits the confidence rule may flag (chosen on validation)
TEMPERATURE_RANGE = (0.05, 20.0)  # where `fit_temperature` searches; a file outside it was not written by it


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities -> softmax(log p / T), float32. T = 1 returns them unchanged."""
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs.astype(np.float64), 1e-30, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-30, None)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising validation NLL: golden-section search on log T (NLL is unimodal in it)."""
    if len(labels) == 0:
        raise DigitlabError("calibration needs labelled validation images; got none")
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = (nll(apply_temperature(probs, float(np.exp(t))), labels) for t in (a, b))
    for _ in range(60):  # interval shrinks 0.618x per step: 60 steps reach ~1e-12 in log T
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(apply_temperature(probs, float(np.exp(a))), labels)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(apply_temperature(probs, float(np.exp(b))), labels)
    return float(np.exp((lo + hi) / 2))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Per confidence bin: count, mean confidence, accuracy; and the expected calibration error."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    safe = np.maximum(count, 1)
    ece = float(np.abs(acc_sum - conf_sum).sum() / max(len(labels), 1))
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": (conf_sum / safe).tolist(),
            "accuracy": (acc_sum / safe).tolist(), "ece": ece}


def confidence_threshold(calibrated: np.ndarray, rate: float = VAL_FLAG_RATE) -> float:
    """The top-probability cut below which `rate` of these (validation) predictions fall."""
    top = np.sort(calibrated.max(axis=1))
    return float(top[int(rate * len(top))]) if len(top) else DEFAULT_MIN_CONFIDENCE


def calibrate_probs(probs: np.ndarray, labels: np.ndarray, source: str) -> dict[str, Any]:
    """Everything calibration.json holds, from uncalibrated validation probabilities."""
    labels = np.asarray(labels).astype(np.int64)
    temperature = fit_temperature(probs, labels)
    after = apply_temperature(probs, temperature)
    return {
        "temperature": temperature,
        "min_confidence": confidence_threshold(after),
        "source": source,
        "count": len(labels),
        "nll_before": nll(probs, labels),
        "nll_after": nll(after, labels),
        "before": reliability(probs, labels),
        "after": reliability(after, labels),
    }


def save_calibration(run_dir: str | Path, calibration: dict[str, Any]) -> Path:
    path = Path(run_dir) / CALIBRATION_FILE
    atomic_write_json(path, calibration)
    return path


def load_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """calibration.json of a run/ensemble folder, or None if it was never calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        calibration = json.loads(path.read_text())
        temperature = float(calibration["temperature"])
        min_confidence = float(calibration.get("min_confidence", DEFAULT_MIN_CONFIDENCE))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DigitlabError(f"{path}: corrupt calibration file ({exc.__class__.__name__}: {exc})") from None
    # one near 0 or huge turns softmax into NaN or a constant
    if not (np.isfinite(temperature) and TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]):
        raise DigitlabError(f"{path}: temperature {temperature} must be a positive number in "
                            f"{TEMPERATURE_RANGE[0]:g}..{TEMPERATURE_RANGE[1]:g}")
    if not 0 <= min_confidence <= 1:  # NaN too: it would flag nothing, silently
        raise DigitlabError(f"{path}: min_confidence {min_confidence} must be a probability in [0, 1]")
    return calibration


def calibration_meta(run_dir: str | Path) -> dict[str, Any]:
    """{"calibration": {temperature, min_confidence}} to merge into a predictor's meta, or {}."""
    calibration = load_calibration(run_dir)
    if calibration is None:
        return {}
    return {"calibration": {"temperature": float(calibration["temperature"]),
                            "min_confidence": float(calibration.get("min_confidence", DEFAULT_MIN_CONFIDENCE))}}


def apply_run_calibration(probs: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Apply the temperature a predictor's meta carries (none: unchanged)."""
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    return apply_temperature(probs, temperature)
