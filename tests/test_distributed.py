"""Data-parallel training with torchrun: two or three CPU processes over gloo on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from device_helpers import assert_same_weights, untimed
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.train import read_metrics

pytestmark = pytest.mark.slow  # ~10 s a test with two processes, ~45 s for the three-process resume

RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from safetensors.torch import save_file
    from digitlab.presets import get_preset
    from digitlab.train import fit

    config = get_preset("quick").with_overrides(data="kaggle:" + sys.argv[1], epochs=2, batch_size=64,
                                                val_split=0.2, lr=3e-3)
    result = fit(config, sys.argv[2])
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(sys.argv[3], "rank%s.safetensors" % os.environ["RANK"]))
    """
)


# Killed at its step 3 of epoch 2 by rank 0 (the only rank that sees events); torchrun then ends the others.
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from digitlab.presets import get_preset
    from digitlab.train import fit

    def kill(event):
        if sys.argv[3] == "kill" and event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    config = get_preset("quick").with_overrides(data="kaggle:" + sys.argv[1], epochs=3, batch_size=48,
                                                val_split=0.2, lr=3e-3)
    fit(config, sys.argv[2], callbacks=[kill])
    """
)


def _torchrun(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


@pytest.fixture(scope="module")
def csv_3000(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(3000)))
    return path


def test_two_processes_learn_and_end_with_identical_weights(tmp_path: Path, csv_3000: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run = tmp_path / "run"
    proc = _torchrun(str(script), str(csv_3000), str(run), str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(tmp_path / "rank0.safetensors", tmp_path / "rank1.safetensors")
    # rank 0 alone wrote the run folder: one record per epoch, each with validation
    epochs = [r for r in read_metrics(run) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["val_acc"] > 0.85
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2
    # both shards were trained on: 2,400 images / batch 64 = 37 steps per epoch
    assert len([r for r in read_metrics(run) if r["type"] == "batch"]) == 2 * 37
    assert load_file(str(run / "model.safetensors")).keys() == load_file(str(tmp_path / "rank0.safetensors")).keys()


def test_torchrun_module_cli(tmp_path: Path, csv_3000: Path) -> None:
    proc = _torchrun("-m", "digitlab", "train", "--preset", "quick", "--data", f"kaggle:{csv_3000}",
                     "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("validation accuracy") == 1  # printed by rank 0 only
    assert (tmp_path / "run" / "model.json").is_file()


def test_three_processes_killed_then_resumed_end_as_if_never_stopped(tmp_path: Path, csv_3000: Path) -> None:
    # Three ranks, because two hide the failure: a sum of two gradients is the same in either order,
    # while DDP's own all-reduce adds three in an order that changes with its bucket layout, which a
    # resumed process builds afresh (the weights then differed in their last bits).
    script = tmp_path / "rank.py"
    script.write_text(KILL_SCRIPT)
    reference = _torchrun(str(script), str(csv_3000), str(tmp_path / "reference"), "run", cwd=tmp_path, processes=3)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "killed"
    killed = _torchrun(str(script), str(csv_3000), str(run), "kill", cwd=tmp_path, processes=3)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (run / "model.safetensors").exists()
    assert [r["epoch"] for r in read_metrics(run) if r["type"] == "epoch"] == [1]  # died in epoch 2
    resumed = _torchrun("-m", "digitlab", "train", "--resume", str(run), "--quiet", cwd=tmp_path, processes=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "reference" / "model.safetensors", run / "model.safetensors")
    assert untimed(read_metrics(run)) == untimed(read_metrics(tmp_path / "reference"))
