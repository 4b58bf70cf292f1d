"""Outlier exposure: the non-digit pool, its effect on the model's confidence, and exact resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from device_helpers import assert_same_weights
from digitlab.data import DigitData
from digitlab.errors import DigitlabError
from digitlab.outliers import non_digit_images
from digitlab.presets import get_preset
from digitlab.train import TrainingInterrupted, fit


def test_pool_is_seeded_and_inked(mnist_train: DigitData) -> None:
    digits = mnist_train.images[:100]
    a, b = non_digit_images(60, 3, digits), non_digit_images(60, 3, digits)
    assert a.shape == (60, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, non_digit_images(60, 4, digits))
    ink = (a >= 64).sum(axis=(1, 2))
    assert (ink > 0).all()  # every kind leaves ink after MNIST-style preprocessing


@pytest.mark.parametrize("field, value, message", [
    ("outliers", 1.5, "outliers must be in [0, 1]"),
    ("outliers", -0.1, "outliers must be in [0, 1]"),
    ("outlier_weight", -1.0, "outlier_weight must be at least 0"),
])
def test_config_checks_outlier_fields(field: str, value: float, message: str) -> None:
    with pytest.raises(DigitlabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        get_preset("quick").with_overrides(**{field: value}).validate()


def _config(small: DigitData, tmp_path: Path, **kw):
    from digitlab.data import write_kaggle_csv

    csv = tmp_path / "train.csv"
    if not csv.exists():
        write_kaggle_csv(csv, small)
    base = dict(data=f"kaggle:{csv}", epochs=2, batch_size=64, val_split=0.2, outliers=0.25, outlier_weight=1.0)
    base.update(kw)
    return get_preset("quick").with_overrides(**base)


def _mean_max_prob(run_dir: Path, images: np.ndarray) -> float:
    from digitlab.inference import load_predictor

    return float(load_predictor(run_dir, precision="fp32", calibrated=False).predict_proba(images).max(1).mean())


@pytest.mark.slow
def test_exposure_lowers_confidence_on_non_digits_and_resumes_exactly(tmp_path: Path,
                                                                      mnist_train: DigitData) -> None:
    small = mnist_train.subset(np.arange(20000, 21600))
    exposed = fit(_config(small, tmp_path), tmp_path / "exposed", progress=False)
    plain = fit(_config(small, tmp_path, outliers=0.0), tmp_path / "plain", progress=False)
    held_out = non_digit_images(120, 99, mnist_train.images[:200])  # another seed than any run's pool
    assert _mean_max_prob(exposed.run_dir, held_out) < _mean_max_prob(plain.run_dir, held_out) - 0.1

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(_config(small, tmp_path), tmp_path / "stopped", callbacks=[ctrl_c], progress=False)
    resumed = fit(None, resume=tmp_path / "stopped", progress=False)
    assert_same_weights(exposed.run_dir / "model.safetensors", resumed.run_dir / "model.safetensors")
