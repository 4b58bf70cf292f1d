"""On a CUDA machine: every preset trains there (as CUDA graphs, the default there; eagerly too,
with the same weights), an interrupted run resumes to the same weights, and evaluate, predict and
export read what the GPU trained. Skipped without CUDA.

Data is made here (the GPU machine has no MNIST package): each class is a bar at its own place,
so a few steps already learn it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from device_helpers import assert_same_weights, bars, untimed
from digitlab.cudagraph import unsupported_reason, used_by_default
from digitlab.data import DigitData
from digitlab.presets import get_preset, list_presets
from digitlab.train import TrainingInterrupted, fit, read_metrics, steps_per_epoch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def data() -> tuple[DigitData, DigitData]:
    # 4,096 images: 128 steps an epoch at batch 32, so a Ctrl-C lands inside an epoch's 50-step blocks
    return bars(4096, 0), bars(512, 1)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_on_cuda(preset: str, tmp_path: Path, data) -> None:
    config = get_preset(preset).with_overrides(epochs=2, batch_size=64, device="cuda")
    result = fit(config, tmp_path / preset, data=data)
    assert next(result.model.parameters()).device.type == "cuda"
    resolved = json.loads((result.run_dir / "config.json").read_text())["resolved"]
    assert resolved["cuda_graphs"] is (used_by_default() and unsupported_reason(torch.device("cuda"), 1) is None)
    assert np.isfinite(result.final["val_loss"])
    batches = [r for r in read_metrics(result.run_dir) if r["type"] == "batch"]
    assert len(batches) == 2 * steps_per_epoch(len(data[0]), config)  # every batch written, none lost


@pytest.mark.parametrize(("preset", "stop_epoch", "stop_step"), [
    ("best", 1, 10),  # EMA and augmentation on the GPU's generator
    ("seed2017", 2, 3),  # dropout draws from the CUDA default generator: its state travels in the checkpoint
])
def test_ctrl_c_then_resume_on_cuda_ends_with_the_same_weights(preset: str, stop_epoch: int, stop_step: int,
                                                               tmp_path: Path, data) -> None:
    """The eager path (--no-cuda-graphs; the default where graphs cannot be used)."""
    config = get_preset(preset).with_overrides(epochs=2, batch_size=32, device="cuda", cuda_graphs=False)
    reference = fit(config, tmp_path / "reference", data=data)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == stop_epoch and event["step"] == stop_step:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stop:
        fit(config, tmp_path / "stopped", callbacks=[ctrl_c], data=data)
    assert stop.value.step == 50  # a GPU reads losses, and honours Ctrl-C, every 50 steps
    resumed = fit(None, resume=tmp_path / "stopped", data=data)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(resumed.run_dir))


@pytest.mark.parametrize("preset", ["best", "seed2017", "robust"])
def test_cuda_graphs_train_exactly_as_without(preset: str, tmp_path: Path, data, caplog) -> None:
    """Graphs (the default on CUDA) change the speed only: the captured step (gather, augmentation,
    outliers, forward, backward) and EMA update give the eager run's weights and metrics, bit for bit."""
    config = get_preset(preset).with_overrides(epochs=2, batch_size=64, device="cuda")
    eager = fit(config.with_overrides(cuda_graphs=False), tmp_path / "eager", data=data)
    with caplog.at_level(logging.WARNING):
        graphed = fit(config.with_overrides(cuda_graphs=True), tmp_path / "graphed", data=data)
    assert "not used" not in caplog.text
    assert_same_weights(eager.model.state_dict(), graphed.model.state_dict())
    assert untimed(read_metrics(eager.run_dir)) == untimed(read_metrics(graphed.run_dir))


def test_ctrl_c_then_resume_with_cuda_graphs_ends_with_the_same_weights(tmp_path: Path, data) -> None:
    """A resumed run captures its graphs afresh after a few eager steps: still the same weights."""
    config = get_preset("best").with_overrides(epochs=2, batch_size=32, device="cuda", cuda_graphs=True)
    reference = fit(config, tmp_path / "reference", data=data)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 1 and event["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(config, tmp_path / "stopped", callbacks=[ctrl_c], data=data)
    resumed = fit(None, resume=tmp_path / "stopped", data=data)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, data) -> Path:
    config = get_preset("quick").with_overrides(epochs=2, batch_size=64, device="cuda")
    return fit(config, tmp_path_factory.mktemp("cuda") / "quick", data=data).run_dir


def test_evaluate_on_cuda_matches_the_cpu(cuda_run: Path, data, monkeypatch) -> None:
    from digitlab.evaluate import evaluate_run
    from digitlab.inference import load_predictor

    # cuDNN's fp32 convolutions default to TF32 (about 1e-3 relative error): compared in true fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    on_gpu = load_predictor(cuda_run, precision="fp32", device="cuda")
    on_cpu = load_predictor(cuda_run, precision="fp32", device="cpu")
    val = data[1]
    gpu_probs, cpu_probs = on_gpu.predict_proba(val.images), on_cpu.predict_proba(val.images)
    assert np.abs(gpu_probs - cpu_probs).max() < 1e-3
    assert evaluate_run(on_gpu, val).accuracy > 0.9
    assert evaluate_run(on_gpu, val, tta=True).accuracy > 0.9


def test_predict_and_export_a_cuda_trained_run(cuda_run: Path, data, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from digitlab.export import export_onnx, parity_check
    from digitlab.predict import predict_inputs

    npy = tmp_path / "digits.npy"
    np.save(npy, data[1].images[:50])
    result = predict_inputs(cuda_run, [str(npy)])
    assert len(result.predictions) == 50
    onnx_path = export_onnx(cuda_run, tmp_path / "model.onnx")
    assert parity_check(cuda_run, onnx_path, data[1].images[:200])["agreement"] == 1.0
