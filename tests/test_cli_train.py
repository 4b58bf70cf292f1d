"""What `digitlab train` says: where a resumed run picks up, that a finished run is finished,
singular and plural, and a clean line for Ctrl-C before training has started."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.presets import get_preset
from digitlab.progress import start_line
from digitlab.train import TrainingInterrupted, fit


@pytest.fixture(scope="module")
def csv_320(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(40000, 40320)))
    return path


def _config(csv: Path, epochs: int):
    return get_preset("fast").with_overrides(data=f"kaggle:{csv}", epochs=epochs, batch_size=32, val_split=0.25,
                                             epoch_fraction=1.0)


def test_resume_says_where_it_picks_up(tmp_path: Path, csv_320: Path, capsys) -> None:
    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(_config(csv_320, 2), tmp_path / "run", callbacks=[ctrl_c])
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert f"resuming fast in {tmp_path / 'run'} at epoch 2, step 3 of 2 epochs" in err
    assert "training fast" not in err


def test_resuming_a_finished_run_says_it_is_finished(tmp_path: Path, csv_320: Path, capsys) -> None:
    fit(_config(csv_320, 1), tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert f"{tmp_path / 'run'}: already finished (1 epoch); nothing to resume" in captured.err
    assert "epoch   1/1" not in captured.err  # nothing was trained again


def test_start_line_counts_in_singular_and_plural() -> None:
    event = {"config": get_preset("quick").with_overrides(epochs=1), "device": "cpu", "precision": "bf16",
             "train_count": 1, "val_count": 0, "run_dir": "runs/x"}
    assert "1 epoch ->" in start_line(event) and "on 1 image," in start_line(event)
    event["config"], event["train_count"] = get_preset("quick"), 48000
    assert "3 epochs ->" in start_line(event) and "on 48,000 images," in start_line(event)
    event["config"], event["train_count"] = get_preset("fast"), 60000  # one pass over 60% of the images
    assert "on 60,000 images (a random 60% of them each epoch), validating on 0;" in start_line(event)


def test_ctrl_c_before_training_starts_is_one_line(monkeypatch, capsys) -> None:
    import digitlab.progress

    def interrupted(*args, **kwargs):  # as if Ctrl-C arrived while torch was still importing
        raise KeyboardInterrupt

    monkeypatch.setattr(digitlab.progress, "TrainingProgress", interrupted)
    assert main(["train", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


def test_every_recipe_flag_reaches_the_config(monkeypatch, tmp_path: Path) -> None:
    import digitlab.train

    seen = {}

    def fake_fit(config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop right there; main turns it into exit 130

    monkeypatch.setattr(digitlab.train, "fit", fake_fit)
    argv = ["train", "--preset", "quick", "--data", "mnist:test", "--val-data", "mnist:train", "--val-split", "0.1",
            "--epochs", "7", "--epoch-fraction", "0.5", "--batch-size", "33", "--precision", "fp32", "--lr", "0.02",
            "--optimizer", "sgd", "--schedule", "cosine", "--label-smoothing", "0.05", "--seed", "9",
            "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 130
    config = seen["config"]
    assert (config.data, config.val_data, config.val_split, config.epochs, config.epoch_fraction) == (
        "mnist:test", "mnist:train", 0.1, 7, 0.5)
    assert (config.batch_size, config.precision, config.lr, config.optimizer, config.schedule) == (
        33, "fp32", 0.02, "sgd", "cosine")
    assert (config.label_smoothing, config.seed, config.device, config.preset) == (0.05, 9, "cpu", "quick")
    assert config.cuda_graphs is True


@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "--lr", "20"], "--lr: learning rate must be in (0, 10], got 20.0"),
    (["train", "--preset", "fast", "--val-split", "1.5"], "--val-split: val split must be in [0, 1), got 1.5"),
    (["train", "--epoch-fraction", "0"], "--epoch-fraction: epoch fraction must be in (0, 1], got 0.0"),
    (["ensemble", "--preset", "fast", "--members", "2", "--epoch-fraction", "2"],
     "--epoch-fraction: epoch fraction must be in (0, 1], got 2.0"),
])
def test_a_refused_flag_is_named_by_its_flag(argv, expected, tmp_path: Path, capsys) -> None:
    """It used to be named by the preset it overrides ("quick: learning rate must be ...")."""
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == f"digitlab: error: {expected}"
    assert not (tmp_path / "r").exists()
