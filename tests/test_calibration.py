"""Temperature scaling: the fit recovers a known temperature, lowers NLL, is stored by fit and applied on load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digitlab.calibration import (
    CALIBRATION_FILE,
    apply_temperature,
    calibrate_probs,
    fit_temperature,
    load_calibration,
    nll,
    reliability,
)
from digitlab.errors import DigitlabError
from digitlab.inference import load_predictor


def _overconfident(n: int = 4000, true_t: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), reported as softmax(z * true_t): an overconfident model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 10))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in p_true])
    sharp = np.exp(z * true_t)
    return (sharp / sharp.sum(1, keepdims=True)).astype(np.float32), labels


def test_fit_recovers_the_temperature_and_lowers_nll_and_ece() -> None:
    probs, labels = _overconfident()
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    after = apply_temperature(probs, t)
    assert nll(after, labels) < nll(probs, labels)
    assert reliability(after, labels)["ece"] < reliability(probs, labels)["ece"] / 2
    np.testing.assert_allclose(after.sum(1), 1, atol=1e-5)


def test_temperature_one_changes_nothing_and_order_is_kept() -> None:
    probs, _ = _overconfident(100)
    assert apply_temperature(probs, 1.0) is probs
    np.testing.assert_array_equal(apply_temperature(probs, 3.0).argmax(1), probs.argmax(1))


def test_reliability_counts_every_image_once() -> None:
    probs, labels = _overconfident(500)
    r = reliability(probs, labels)
    assert sum(r["count"]) == 500
    assert 0 <= r["ece"] <= 1


def test_fit_stores_calibration_and_the_loader_applies_it(tiny_run: Path) -> None:
    calibration = load_calibration(tiny_run)
    assert calibration is not None
    assert calibration["temperature"] > 0
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert calibration["source"] == "mnist:train[50000:51000]"  # the validation data fit was given
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    raw = load_predictor(tiny_run, calibrated=False).predict_proba(images)
    cal = load_predictor(tiny_run).predict_proba(images)
    np.testing.assert_allclose(cal, apply_temperature(raw, calibration["temperature"]), atol=1e-5)


def test_calibrate_command_on_a_copy(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / CALIBRATION_FILE).unlink()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "digitlab", "calibrate", str(run)],
                         capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    assert "temperature" in out.stdout and "ECE" in out.stdout
    stored = json.loads((run / CALIBRATION_FILE).read_text())
    # the run's own validation split, rebuilt from its config: 10% of mnist:train (as train splits it)
    assert stored["source"] == "mnist:train[val]" and stored["count"] == 5999
    # measured on that split (a Kaggle run's default), the note names train, not `calibrate --data`
    from digitlab.evaluate import evaluate_run
    from digitlab.overlap import validation_data

    notes = evaluate_run(run, validation_data(run)).extra["notes"]
    assert any("fitted on these validation images (mnist:train[val]), as train does" in note for note in notes)
    assert not any("calibrate --data" in note for note in notes)


def test_calibrate_on_a_named_source_leaves_out_training_images(tiny_run: Path, tmp_path: Path,
                                                                 mnist_train) -> None:
    """tiny_run trained on mnist:train[:3000]: rows 2900..3099 are half seen, half new."""
    import shutil

    from digitlab.evaluate import calibrate_run, evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rows = np.arange(2900, 3100)
    csv = tmp_path / "labelled.csv"
    table = np.column_stack([mnist_train.labels[rows], mnist_train.images[rows].reshape(len(rows), -1)])
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    np.savetxt(csv, table, fmt="%d", delimiter=",", header=header, comments="")
    source = f"kaggle:{csv}"
    calibration = calibrate_run(run, source)
    assert (calibration["seen_left_out"], calibration["count"], calibration["source"]) == (100, 100, source)
    assert json.loads((run / CALIBRATION_FILE).read_text())["count"] == 100
    # measuring on the very source the temperature was fitted on says so
    notes = evaluate_run(run, source).extra["notes"]
    assert any("temperature was fitted on" in note for note in notes)
    assert not any("temperature was fitted on" in n for n in evaluate_run(run, "mnist:test").extra["notes"])
    seen_only = tmp_path / "seen.csv"
    np.savetxt(seen_only, table[:100], fmt="%d", delimiter=",", header=header, comments="")
    with pytest.raises(DigitlabError, match="every image was in the run's training data"):
        calibrate_run(run, f"kaggle:{seen_only}")


@pytest.mark.parametrize(("content", "message"), [
    ('{"temperature": -1}', "temperature -1.0 must be a positive number in 0.05..20"),
    ('{"temperature": 1e-320}', "temperature 1e-320 must be a positive number"),  # softmax would be NaN
    ('{"temperature": 1.2, "min_confidence": "abc"}', "corrupt calibration file (ValueError"),
    ('{"temperature": 1.2, "min_confidence": NaN}', "min_confidence nan must be a probability in [0, 1]"),
    ('[1, 2]', "corrupt calibration file"),
])
def test_corrupt_calibration_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / CALIBRATION_FILE).write_text(content)
    with pytest.raises(DigitlabError) as exc:
        load_calibration(tmp_path)
    assert message in str(exc.value)


def test_calibrate_probs_threshold_flags_few_validation_images() -> None:
    probs, labels = _overconfident(5000)
    c = calibrate_probs(probs, labels, "synthetic")
    flagged = (apply_temperature(probs, c["temperature"]).max(1) < c["min_confidence"]).mean()
    assert flagged <= 0.003
