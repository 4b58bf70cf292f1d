"""The training loop: it learns, writes a complete run folder, is deterministic, and resumes
bit-exactly after Ctrl-C or SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from device_helpers import assert_same_weights, untimed
from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.presets import get_preset
from digitlab.train import TrainingInterrupted, fit, read_metrics


@pytest.fixture(scope="module")
def csv_2000(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(2000)))
    return path


@pytest.fixture(scope="module")
def csv_640(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(10000, 10640)))
    return path


@pytest.mark.slow
def test_one_epoch_on_2000_images_learns_and_writes_a_complete_run(tmp_path: Path, csv_2000: Path) -> None:
    config = get_preset("quick").with_overrides(data=f"kaggle:{csv_2000}", epochs=1, batch_size=32,
                                                val_split=0.2)
    result = fit(config, tmp_path / "run")
    assert result.final["val_acc"] > 0.85
    run = result.run_dir
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "model.json", "checkpoint.safetensors"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["preset"] == "quick" and cfg["config"]["optimizer"] == "adam"
    assert cfg["data"]["train_count"] == 1600 and cfg["data"]["val_count"] == 400
    assert cfg["versions"]["torch"] == torch.__version__
    records = read_metrics(run)
    batches = [r for r in records if r["type"] == "batch"]
    assert len(batches) == 1600 // 32 and all(np.isfinite(r["loss"]) for r in batches)
    epoch = [r for r in records if r["type"] == "epoch"]
    assert len(epoch) == 1 and {"train_loss", "val_acc", "lr", "images_per_s", "train_seconds"} <= epoch[0].keys()
    meta = json.loads((run / "model.json").read_text())
    assert meta["preset"] == "quick" and meta["parameters"] == 594_922
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["data"]["train_fingerprint"] == cfg["data"]["train_fingerprint"]


def test_epoch_fraction_draws_a_fresh_share_of_the_data_each_epoch(tmp_path: Path, csv_640: Path) -> None:
    # 480 training images, half of them per epoch: 240 // 32 = 7 steps, and the one-cycle
    # schedule spans exactly those steps (its lr has annealed to near zero by the last one)
    config = get_preset("fast").with_overrides(data=f"kaggle:{csv_640}", epochs=2, batch_size=32, val_split=0.25,
                                               epoch_fraction=0.5)
    result = fit(config, tmp_path / "run")
    batches = [r for r in read_metrics(result.run_dir) if r["type"] == "batch"]
    assert [(r["epoch"], r["step"]) for r in batches] == [(e, s) for e in (1, 2) for s in range(1, 8)]
    assert batches[-1]["lr"] < 0.05 * config.lr  # built for 30 steps it would still be near its peak
    assert json.loads((result.run_dir / "config.json").read_text())["resolved"]["steps_per_epoch"] == 7


def test_less_than_one_batch_per_epoch_is_refused(tmp_path: Path, csv_640: Path) -> None:
    base = get_preset("fast").with_overrides(data=f"kaggle:{csv_640}", val_split=0.25)
    with pytest.raises(DigitlabError, match=r"479 training images is fewer than one batch of 512$"):
        fit(base.with_overrides(batch_size=512, epoch_fraction=1.0), tmp_path / "a")
    with pytest.raises(DigitlabError, match=r"479 training images x epoch fraction 0.1 is fewer than one batch of 64$"):
        fit(base.with_overrides(batch_size=64, epoch_fraction=0.1), tmp_path / "b")


def _tiny_config(csv: Path, **kw):
    base = dict(data=f"kaggle:{csv}", epochs=3, batch_size=32, val_split=0.25)
    base.update(kw)
    return get_preset("seed2017").with_overrides(**base)


@pytest.mark.slow
def test_same_seed_same_metrics_and_ctrl_c_resume_is_bit_identical(tmp_path: Path, csv_640: Path) -> None:
    config = _tiny_config(csv_640)
    reference = fit(config, tmp_path / "reference")
    again = fit(config, tmp_path / "again")
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(again.run_dir))
    assert_same_weights(reference.run_dir / "model.safetensors", again.run_dir / "model.safetensors")

    def ctrl_c(event: dict) -> None:  # a real SIGINT to ourselves, mid-epoch
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stop:
        fit(config, tmp_path / "stopped", callbacks=[ctrl_c])
    assert (stop.value.epoch, stop.value.step) == (2, 4)
    assert stop.value.resume_command == f"digitlab train --resume {tmp_path / 'stopped'}"
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
    resumed = fit(config, resume=tmp_path / "stopped")
    assert_same_weights(reference.run_dir / "model.safetensors", resumed.run_dir / "model.safetensors")
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(resumed.run_dir))


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from digitlab.presets import get_preset
    from digitlab.train import fit

    def kill(event):
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 7:
            os.kill(os.getpid(), signal.SIGKILL)

    config = get_preset("seed2017").with_overrides(
        data="kaggle:" + sys.argv[1], epochs=3, batch_size=32, val_split=0.25)
    fit(config, sys.argv[2], callbacks=[kill])
    """
)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, csv_640: Path) -> None:
    reference = fit(_tiny_config(csv_640), tmp_path / "reference")
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(csv_640), str(run)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (run / "model.safetensors").exists()
    assert [r["epoch"] for r in read_metrics(run) if r["type"] == "epoch"] == [1]
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_weights(reference.run_dir / "model.safetensors", run / "model.safetensors")
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(run))


@pytest.mark.slow
def test_cli_ctrl_c_saves_and_prints_resume_command(tmp_path: Path, csv_640: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "digitlab", "train", "--preset", "seed2017", "--data", f"kaggle:{csv_640}",
         "--epochs", "1000", "--batch-size", "32", "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(r["type"] == "epoch" for r in read_metrics(run)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"resume with: digitlab train --resume {run}" in err
    assert "Traceback" not in err
    assert (run / "checkpoint.safetensors").is_file()


def test_train_cli_plain_lines_when_not_a_terminal(tmp_path: Path, csv_640: Path, capsys) -> None:
    code = main(["train", "--preset", "seed2017", "--data", f"kaggle:{csv_640}", "--epochs", "2",
                 "--batch-size", "64", "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 0
    lines = [line for line in captured.err.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "val_acc" in lines[0] and "img/s" in lines[0]
    assert "\r" not in captured.err
    assert "validation accuracy" in captured.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'; choose one of: "),
        (["train", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["train", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["train", "--epoch-fraction", "1.5"], "epoch fraction must be in (0, 1], got 1.5"),
        (["train", "--resume", "/nonexistent/run"], "/nonexistent/run: no such folder (expected a run folder"),
        (["train", "--resume", __file__], f"{__file__}: a file, expected a run folder to resume"),
        (["train", "--lr", "1e300"], "learning rate must be in (0, 10], got 1e+300"),
        (["train", "--seed", "-1"], "--seed: must be 0 or more, got -1"),
        (["train", "--seed", str(2**63)], "--seed: must be at most 9223372036854775807, got"),
        (["train", "--out", "/proc/digitlab-run"], "/proc/digitlab-run"),  # cannot be created: one line
    ],
)
def test_bad_train_arguments(argv: list[str], message: str, capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects types itself, also with exit 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_resume_refuses_a_config_edited_since_the_checkpoint(tmp_path: Path, csv_640: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = _tiny_config(csv_640, epochs=2)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 1 and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(config, tmp_path / "run", callbacks=[ctrl_c])
    # a checkpoint written before the photometric augmentation fields existed still resumes
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "older")
    older = tmp_path / "older" / "checkpoint.safetensors"
    with safe_open(str(older), framework="pt") as fh:
        header = json.loads(fh.metadata()["digitlab"])
    for key in ("thickness", "blur", "low_resolution", "noise", "background"):
        del header["info"]["config"]["augment"][key]
    save_file(load_file(str(older)), str(older), metadata={"digitlab": json.dumps(header)})
    assert fit(None, resume=tmp_path / "older").final["epoch"] == 2
    path = tmp_path / "run" / "config.json"
    original = path.read_text()
    edited = json.loads(original)
    edited["config"]["epochs"] = 5  # "I want more epochs": not what the checkpoint's schedule was built for
    path.write_text(json.dumps(edited))
    with pytest.raises(DigitlabError, match=r"config.json: changed since the checkpoint \(epochs: 2 -> 5\)"):
        fit(None, resume=tmp_path / "run")
    path.write_text(original)
    # a header without the run's position (hand-edited; the checksum covers only the tensors)
    state = tmp_path / "run" / "checkpoint.safetensors"
    tensors = load_file(str(state))
    with safe_open(str(state), framework="pt") as fh:
        header = json.loads(fh.metadata()["digitlab"])
    del header["info"]["position"]
    save_file(tensors, str(state), metadata={"digitlab": json.dumps(header)})
    with pytest.raises(DigitlabError, match="corrupt checkpoint \\(its header lacks the run's position"):
        fit(None, resume=tmp_path / "run")


def test_a_diverged_loss_stops_training_with_a_clear_error() -> None:
    from digitlab.train import EpochState, _Pending, _record_block

    state = EpochState(epoch=2, perm=torch.arange(12), step=3)
    pending = [_Pending(torch.tensor(v), torch.tensor(2), 4, 0.1) for v in (0.7, float("nan"), 0.6)]
    with pytest.raises(DigitlabError, match=r"diverged: the loss is nan at epoch 2, step 2; train again with a lower"):
        _record_block(pending, state, time.perf_counter(), 3, 1, None)


def test_a_block_is_timed_until_its_losses_are_read(monkeypatch) -> None:
    """On a GPU, reading the losses waits for the card to finish the block: that wait is training
    time. (The clock used to be read before the read, counting only the time to queue the work.)"""
    from digitlab import train

    class SlowRead:  # stands for the block's stacked losses on a busy GPU
        def __init__(self, values: list[float]) -> None:
            self.values = values

        def tolist(self) -> list[float]:
            time.sleep(0.2)
            return self.values

    monkeypatch.setattr(train.torch, "stack", lambda tensors: SlowRead([float(t) for t in tensors]))
    state = train.EpochState(epoch=1, perm=torch.arange(8))
    pending = [train._Pending(torch.tensor(0.5), torch.tensor(3), 4, 0.1) for _ in range(2)]
    train._record_block(pending, state, time.perf_counter(), 2, 1, None)
    assert state.train_seconds >= 0.4  # two reads of 0.2 s each


def test_the_largest_seed_trains(tmp_path: Path, csv_640: Path) -> None:
    """The augmentation stream is derived from the seed: the derivation must not overflow."""
    fit(_tiny_config(csv_640, epochs=1).with_overrides(seed=2**63 - 1), tmp_path / "run")


def test_unlabelled_data_refused(tmp_path: Path, mnist_train: DigitData, capsys) -> None:
    test_csv = tmp_path / "test.csv"
    write_kaggle_csv(test_csv, mnist_train.subset(np.arange(50)), with_labels=False)
    assert main(["train", "--data", f"kaggle:{test_csv}", "--out", str(tmp_path / "r")]) == 2
    assert "has no labels; training needs a labelled source" in capsys.readouterr().err


def test_resuming_a_folder_that_is_not_a_run_says_what_it_is(tmp_path: Path) -> None:
    ensemble = tmp_path / "mix"
    (ensemble / "member-0").mkdir(parents=True)  # an ensemble stopped before its manifest was written
    with pytest.raises(DigitlabError, match=r"mix: an ensemble folder; an ensemble is finished by running the "
                       r"same `digitlab ensemble \.\.\. --out .*mix` again \(its members resume\)"):
        fit(None, resume=ensemble)
    (tmp_path / "other").mkdir()
    with pytest.raises(DigitlabError, match=r"other/config\.json: missing; not a digitlab run folder"):
        fit(None, resume=tmp_path / "other")


def test_corrupt_checkpoint_refused(tmp_path: Path, csv_640: Path, capsys) -> None:
    config = _tiny_config(csv_640, epochs=1)
    fit(config, tmp_path / "run")
    state = tmp_path / "run" / "checkpoint.safetensors"
    blob = bytearray(state.read_bytes())
    blob[-100] ^= 0xFF  # flip one weight byte
    state.write_bytes(bytes(blob))
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "checksum mismatch (corrupt checkpoint)" in capsys.readouterr().err
    state.write_bytes(bytes(blob[:1000]))  # truncated
    with pytest.raises(DigitlabError, match="corrupt checkpoint"):
        fit(config, resume=tmp_path / "run")


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, csv_640: Path) -> None:
    config = _tiny_config(csv_640, epochs=1)
    fit(config, tmp_path / "run")
    with pytest.raises(DigitlabError, match="already holds a run; use --resume"):
        fit(config, tmp_path / "run")


def test_weight_ema_warms_up_then_follows_the_set_decay() -> None:
    from digitlab.train import build_ema, ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 100_000) == 0.999
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, 0.999)
    expected = model[0].weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update_parameters(model)
        if n > 1:  # the first update copies the weights; later ones average with the warm-up decay
            d = ema_decay_at(0.999, n - 1)
            expected = d * expected + (1 - d) * model[0].weight.detach()
        else:
            expected = model[0].weight.detach().clone()
        assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
    # with a fixed 0.999 the average would still sit at the first weights; here it follows the model
    assert (ema.module[0].weight - model[0].weight).abs().max() < 1.0
