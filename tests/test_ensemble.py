"""Ensembles: members with different seeds, averaged probabilities, parallel jobs, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.ensemble import train_ensemble
from digitlab.inference import load_predictor
from digitlab.presets import get_preset


@pytest.fixture(scope="module")
def csv_1000(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("ens") / "train.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(20000, 21000)))
    return path


def _config(csv: Path):
    return get_preset("fast").with_overrides(data=f"kaggle:{csv}", epochs=4, batch_size=32, val_split=0.2)


def test_two_member_ensemble_averages_member_probabilities(tmp_path: Path, csv_1000: Path,
                                                           mnist_test: DigitData) -> None:
    out = train_ensemble(_config(csv_1000), tmp_path / "ens", members=2, first_seed=5)
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"] and manifest["seeds"] == [5, 6]
    images = mnist_test.images[:500]
    ensemble = load_predictor(out)
    assert ensemble.members == 2
    singles = [load_predictor(out / name, calibrated=False).predict_proba(images) for name in manifest["members"]]
    assert not np.allclose(singles[0], singles[1])  # different seeds, different models
    np.testing.assert_allclose(ensemble.predict_proba(images), (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-7)
    accuracy = (ensemble.predict_proba(images).argmax(1) == mnist_test.labels[:500]).mean()
    assert accuracy > 0.8


def test_parallel_jobs_and_rerun_skips_finished_members(tmp_path: Path, csv_1000: Path, capsys) -> None:
    argv = ["ensemble", "--preset", "fast", "--data", f"kaggle:{csv_1000}", "--members", "2", "--jobs", "2",
            "--epochs", "1", "--batch-size", "64", "--val-split", "0.2", "--out", str(tmp_path / "ens")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 to train, 2 at a time" in err
    for i in range(2):
        assert (tmp_path / "ens" / f"member-{i}" / "model.json").is_file()
    assert main(argv) == 0
    assert "0 to train" in capsys.readouterr().err
