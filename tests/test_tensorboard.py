"""`--tensorboard`: event files in the run folder, read back with TensorBoard's own reader; a resume
that neither duplicates nor keeps stale steps; one clear error without the optional package."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digitlab.cli import main
from digitlab.config import TrainConfig
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.presets import get_preset
from digitlab.rundir import read_metrics
from digitlab.train import TrainingInterrupted, fit

STEPS = 15  # 480 training images / batch 32


@pytest.fixture(scope="module")
def tiny(mnist_train: DigitData) -> tuple[DigitData, DigitData]:
    return (mnist_train.subset(np.arange(480), "mnist:train[:480]"),
            mnist_train.subset(np.arange(50000, 50120), "mnist:train[50000:50120]"))


def _config(epochs: int = 2) -> TrainConfig:
    return get_preset("fast").with_overrides(epochs=epochs, batch_size=32, epoch_fraction=1.0, tensorboard=True)


def _events(run_dir: Path) -> EventAccumulator:
    # size_guidance 0: keep every event (the default samples scalars down to 10,000, images to 4)
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_events_hold_batches_epochs_lr_and_the_mistakes(tmp_path: Path, tiny) -> None:
    result = fit(_config(), tmp_path / "run", data=tiny, progress=False)
    acc = _events(tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    batches = [r for r in records if r["type"] == "batch"]
    loss = _scalars(acc, "batch/loss")
    assert [s for s, _ in loss] == list(range(1, 2 * STEPS + 1))
    np.testing.assert_allclose([v for _, v in loss], [r["loss"] for r in batches], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in _scalars(acc, "batch/lr")], [r["lr"] for r in batches], rtol=1e-6)
    assert len({v for _, v in _scalars(acc, "batch/lr")}) > 10  # one-cycle: the schedule is visible
    val_acc = _scalars(acc, "epoch/val_acc")
    assert [s for s, _ in val_acc] == [STEPS, 2 * STEPS]
    np.testing.assert_allclose([v for _, v in val_acc], [r["val_acc"] for r in result.history], rtol=1e-6)
    for tag in ("epoch/train_loss", "epoch/train_acc", "epoch/val_loss", "epoch/lr", "epoch/images_per_s"):
        assert [s for s, _ in _scalars(acc, tag)] == [STEPS, 2 * STEPS]

    (mistakes,) = acc.Images("validation/mistakes")
    (confusion,) = acc.Images("validation/confusion_matrix")
    assert mistakes.step == confusion.step == 2 * STEPS
    assert mistakes.width > 300 and mistakes.height > 100
    assert mistakes.encoded_image_string.startswith(b"\x89PNG")
    (text,) = acc.Tensors("validation/text_summary")
    errors = round((1 - result.final["val_acc"]) * 120)
    assert f"{errors} errors of 120 images".encode() in text.tensor_proto.string_val[0]


def test_resume_neither_duplicates_nor_keeps_stale_steps(tmp_path: Path, tiny) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(_config(), tmp_path / "run", data=tiny, callbacks=[ctrl_c], progress=False)
    # as if a killed session had logged steps past its last checkpoint (step 15 + 3 = 18)
    stale = SummaryWriter(str(tmp_path / "run"))
    for step in range(19, 26):
        stale.add_scalar("batch/loss", 99.0, step)
    stale.close()

    fit(None, resume=tmp_path / "run", data=tiny, progress=False)
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 3  # one file per session
    acc = _events(tmp_path / "run")
    loss = _scalars(acc, "batch/loss")
    assert [s for s, _ in loss] == list(range(1, 2 * STEPS + 1))  # each step once
    assert 99.0 not in [v for _, v in loss]
    np.testing.assert_allclose([v for _, v in loss],
                               [r["loss"] for r in read_metrics(tmp_path / "run") if r["type"] == "batch"], rtol=1e-6)
    assert [s for s, _ in _scalars(acc, "epoch/val_acc")] == [STEPS, 2 * STEPS]
    assert len(acc.Images("validation/mistakes")) == 1
    assert len(acc.Tensors("config/text_summary")) == 1

    fit(None, resume=tmp_path / "run", data=tiny, progress=False)  # finished: nothing more is written
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 3


def test_without_tensorboard_the_flag_is_one_clear_error(tmp_path: Path, tiny, monkeypatch, capsys,
                                                          mnist_train: DigitData) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    with pytest.raises(DigitlabError, match=r"pip install 'digitlab\[tensorboard\]'"):
        fit(_config(), tmp_path / "run", data=tiny, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written

    csv = write_kaggle_csv(tmp_path / "train.csv", mnist_train.subset(np.arange(200)))
    for command in ("train", "ensemble"):
        argv = [command, "--preset", "fast", "--data", f"kaggle:{csv}", "--batch-size", "32", "--tensorboard", "--out",
                str(tmp_path / command)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("digitlab: error: --tensorboard needs the tensorboard package")


def test_the_flag_sets_the_config_of_train_and_ensemble(monkeypatch, tmp_path: Path) -> None:
    import digitlab.ensemble
    import digitlab.train

    seen = []

    def fake(config, *args, **kwargs):
        recipes = config if isinstance(config, list) else [config]  # ensemble: one recipe per preset
        seen.append(all(r.tensorboard for r in recipes))
        raise KeyboardInterrupt

    monkeypatch.setattr(digitlab.train, "fit", fake)
    monkeypatch.setattr(digitlab.ensemble, "train_ensemble", fake)
    main(["train", "--tensorboard", "--out", str(tmp_path / "a")])
    main(["train", "--out", str(tmp_path / "b")])
    main(["ensemble", "--tensorboard", "--out", str(tmp_path / "c")])
    assert seen == [True, False, True]


def test_config_checks_the_field() -> None:
    with pytest.raises(DigitlabError, match="tensorboard must be true or false"):
        TrainConfig(tensorboard="yes").validate()  # type: ignore[arg-type]
    assert TrainConfig.from_dict(TrainConfig(tensorboard=True).to_dict()).tensorboard is True
