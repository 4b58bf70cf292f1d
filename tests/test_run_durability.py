"""A run folder survives a crash at the worst moment: metrics are on disk before the checkpoint
that covers them, resume neither loses nor repeats a record, and a run that failed before its
first checkpoint leaves a folder that `--out` can reuse."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from digitlab import checkpoint as ckpt
from digitlab import train
from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.presets import get_preset
from digitlab.rundir import STATE_FILE
from digitlab.train import fit, read_metrics


@pytest.fixture(scope="module")
def csv_320(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(20000, 20320)))
    return path


def _config(csv: Path, **kw):
    return get_preset("fast").with_overrides(data=f"kaggle:{csv}", epochs=3, batch_size=64, val_split=0.25,
                                             **kw)


class Crash(Exception):
    """Stands in for a SIGKILL: nothing after it runs."""


def _crash_at_epoch(monkeypatch, epoch: int, after_write: bool) -> None:
    real = ckpt.save_state

    def save_state(path, model, optimizer, scheduler, rng, info, extra=None):
        position = info["position"]
        if position == {"epoch": epoch, "step": 0}:
            if after_write:  # the checkpoint is renamed into place, then the process dies
                real(path, model, optimizer, scheduler, rng, info, extra)
            raise Crash
        real(path, model, optimizer, scheduler, rng, info, extra)

    monkeypatch.setattr(train.ckpt, "save_state", save_state)


def _epochs_and_steps(run: Path) -> tuple[list[int], list[tuple[int, int]]]:
    records = read_metrics(run)
    epochs = [r["epoch"] for r in records if r["type"] == "epoch"]
    steps = [(r["epoch"], r["step"]) for r in records if r["type"] == "batch"]
    return epochs, steps


@pytest.mark.parametrize("after_write", [True, False], ids=["after-checkpoint", "before-checkpoint"])
def test_crash_around_the_checkpoint_loses_and_repeats_no_metrics(tmp_path: Path, csv_320: Path, monkeypatch,
                                                                   after_write: bool) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _crash_at_epoch(patch, 2, after_write)
        with pytest.raises(Crash):
            fit(_config(csv_320), run)
    epochs, _ = _epochs_and_steps(run)
    assert epochs == [1, 2]  # epoch 2's record is on disk whether or not its checkpoint is
    checkpoint_epoch = ckpt.load_state(run / STATE_FILE)[1]["info"]["position"]["epoch"]
    assert checkpoint_epoch == (2 if after_write else 1)

    result = fit(None, resume=run)
    epochs, steps = _epochs_and_steps(run)
    assert epochs == [1, 2, 3]
    per_epoch = len(steps) // 3
    assert steps == [(e, s) for e in (1, 2, 3) for s in range(1, per_epoch + 1)]
    assert [r["epoch"] for r in result.history] == [1, 2, 3]


def test_eval_every_zero_is_refused_before_any_folder_exists(tmp_path: Path, csv_320: Path, capsys) -> None:
    with pytest.raises(DigitlabError, match="eval_every must be at least 1"):
        fit(_config(csv_320, eval_every=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"config": _config(csv_320).to_dict() | {"eval_every": 0}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "cli")]) == 2
    assert "eval_every must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_folder_left_before_the_first_checkpoint_can_be_reused_as_out(tmp_path: Path, csv_320: Path, monkeypatch,
                                                                       caplog, capsys) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _crash_at_epoch(patch, 1, after_write=False)
        with pytest.raises(Crash):
            fit(_config(csv_320), run)
    assert (run / "config.json").is_file() and not (run / STATE_FILE).exists()

    assert main(["train", "--resume", str(run)]) == 2
    assert f"no checkpoint to resume from (the run stopped before its first epoch ended); start it afresh " \
           f"with --out {run}" in capsys.readouterr().err

    with caplog.at_level(logging.WARNING, logger="digitlab.train"):
        result = fit(_config(csv_320), run)
    assert "holds a config.json but no checkpoint" in caplog.text and "starting afresh there" in caplog.text
    assert [r["epoch"] for r in read_metrics(run) if r["type"] == "epoch"] == [1, 2, 3]
    assert result.final["epoch"] == 3
    with pytest.raises(DigitlabError, match="already holds a run; use --resume"):
        fit(_config(csv_320), run)  # a folder with a checkpoint is still never overwritten
