"""Evaluation metrics checked against scikit-learn, mistakes ordering, ensembles, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from digitlab.cli import main
from digitlab.data import DigitData, write_idx_dir, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate_predictions, evaluate_run
from digitlab.inference import load_predictor, tta_proba


@pytest.fixture(scope="module")
def test_slice(mnist_test: DigitData) -> DigitData:
    return mnist_test.subset(np.arange(2000), "mnist:test[:2000]")


@pytest.fixture(scope="module")
def slice_proba(tiny_run: Path, test_slice: DigitData) -> np.ndarray:
    return load_predictor(tiny_run).predict_proba(test_slice.images)


def test_numbers_match_sklearn(slice_proba: np.ndarray, test_slice: DigitData) -> None:
    labels = test_slice.labels
    predicted = slice_proba.argmax(1)
    result = evaluate_predictions(slice_proba, labels)
    assert result.total == 2000
    assert result.accuracy == pytest.approx(accuracy_score(labels, predicted))
    assert result.errors == int((predicted != labels).sum()) > 0
    np.testing.assert_array_equal(result.confusion, confusion_matrix(labels, predicted, labels=range(10)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(10),
                                                                     zero_division=0)
    np.testing.assert_allclose([c.precision for c in result.per_class], precision)
    np.testing.assert_allclose([c.recall for c in result.per_class], recall)
    np.testing.assert_allclose([c.f1 for c in result.per_class], f1)
    np.testing.assert_array_equal([c.support for c in result.per_class], support)
    assert result.macro_f1 == pytest.approx(f1.mean())
    assert result.mean_confidence == pytest.approx(slice_proba.max(1).mean(), rel=1e-6)
    assert 0.9 < result.accuracy < 1.0


def test_misclassified_most_confident_first(slice_proba: np.ndarray, test_slice: DigitData) -> None:
    result = evaluate_predictions(slice_proba, test_slice.labels)
    assert len(result.misclassified) == result.errors
    confidences = [m.probability for m in result.misclassified]
    assert confidences == sorted(confidences, reverse=True)
    for m in result.misclassified:
        assert m.true == test_slice.labels[m.index] != m.predicted
        assert m.predicted == slice_proba[m.index].argmax()
        assert m.probability == pytest.approx(slice_proba[m.index].max())
        assert m.top3[0][0] == m.predicted and len(m.top3) == 3
        assert m.top3[0][1] >= m.top3[1][1] >= m.top3[2][1]


def test_argmax_not_rounded_probabilities() -> None:
    # No probability reaches 0.5: rounding first (the seed notebook) would predict 0 for all three.
    probs = np.array([[0.1, 0.2, 0.45, 0.25, 0, 0, 0, 0, 0, 0],
                      [0.0, 0.0, 0.0, 0.3, 0.4, 0.3, 0, 0, 0, 0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.49, 0.51]])
    result = evaluate_predictions(probs, np.array([2, 4, 9]))
    assert result.accuracy == 1.0 and result.errors == 0


def test_classes_never_predicted_or_absent_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)  # digits 5..9 absent
    probs = rng.random((200, 10))
    probs[:, 0] = 0  # digit 0 never predicted
    result = evaluate_predictions(probs, labels)
    p, r, f, s = precision_recall_fscore_support(labels, probs.argmax(1), labels=range(10), zero_division=0)
    np.testing.assert_array_equal([c.support for c in result.per_class], s)
    np.testing.assert_allclose([c.precision for c in result.per_class], p)
    np.testing.assert_allclose([c.recall for c in result.per_class], r)
    np.testing.assert_allclose([c.f1 for c in result.per_class], f)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(DigitlabError, match=r"shape \(N, 10\)"):
        evaluate_predictions(np.zeros((3, 9)), np.zeros(3, dtype=int))
    with pytest.raises(DigitlabError, match="labels of shape"):
        evaluate_predictions(np.zeros((3, 10)), np.zeros(4, dtype=int))
    with pytest.raises(DigitlabError, match=r"labels must be 0\.\.9"):
        evaluate_predictions(np.zeros((1, 10)), np.array([10]))


def test_evaluate_run_and_ensemble(tiny_run: Path, test_slice: DigitData, slice_proba: np.ndarray,
                                   tmp_path: Path) -> None:
    direct = evaluate_predictions(slice_proba, test_slice.labels)
    result = evaluate_run(tiny_run, test_slice)
    assert result.accuracy == direct.accuracy and result.source == "mnist:test[:2000]"
    assert result.fingerprint == test_slice.fingerprint and result.seconds > 0
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"members": [str(tiny_run), str(tiny_run)]}))
    twice = evaluate_run(ensemble, test_slice)  # two identical members average to the same model
    assert twice.accuracy == direct.accuracy and twice.to_dict()["members"] == 2


def test_tta_evaluates_the_averaged_views(tiny_run: Path, test_slice: DigitData) -> None:
    data = test_slice.subset(np.arange(500))
    predictor = load_predictor(tiny_run)
    tta = evaluate_run(tiny_run, data, tta=True)
    expected = evaluate_predictions(tta_proba(predictor, data.images), data.labels)
    plain = evaluate_predictions(predictor.predict_proba(data.images), data.labels)
    assert tta.tta and tta.log_loss == pytest.approx(expected.log_loss, abs=1e-6)
    assert tta.log_loss != pytest.approx(plain.log_loss, abs=1e-3)  # TTA really changed the probabilities
    assert abs(tta.accuracy - plain.accuracy) < 0.03


def test_unlabelled_source_is_an_error(tiny_run: Path, test_slice: DigitData, tmp_path: Path) -> None:
    csv = write_kaggle_csv(tmp_path / "test.csv", test_slice.subset(np.arange(5)), with_labels=False)
    with pytest.raises(DigitlabError, match="has no labels"):
        evaluate_run(tiny_run, f"kaggle:{csv}")


@pytest.fixture(scope="module")
def idx_slice(test_slice: DigitData, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("idx")
    write_idx_dir(folder, test_slice, split="test")
    return f"idx:{folder}:test"


def test_cli_table(tiny_run: Path, idx_slice: str, slice_proba: np.ndarray, test_slice: DigitData,
                   capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tiny_run), "--data", idx_slice, "--mistakes", "5"]) == 0
    out = capsys.readouterr().out
    errors = int((slice_proba.argmax(1) != test_slice.labels).sum())
    assert f"({errors:,} errors of 2,000)" in out
    assert "confusion matrix" in out and "precision" in out
    assert f"most confident mistakes (5 of {errors})" in out


def test_cli_json(tiny_run: Path, idx_slice: str, test_slice: DigitData, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tiny_run), "--data", idx_slice, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 2000 and report["errors"] == len(report["misclassified"])
    assert np.array(report["confusion"]).sum() == 2000
    assert [c["support"] for c in report["per_class"]] == np.bincount(test_slice.labels, minlength=10).tolist()


def test_cli_unlabelled_exits_2(tiny_run: Path, test_slice: DigitData, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    csv = write_kaggle_csv(tmp_path / "test.csv", test_slice.subset(np.arange(5)), with_labels=False)
    assert main(["evaluate", str(tiny_run), "--data", f"kaggle:{csv}"]) == 2
    assert "has no labels" in capsys.readouterr().err
