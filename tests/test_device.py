"""Device correctness checked on the CPU: what crashed on CUDA (a CPU generator drawing for CUDA
images, CPU labels against CUDA logits) and what made the GPU wait every step (host reads of the
loss and of the EMA's count) fail here too, on torch's `meta` device or with a fake generator."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from device_helpers import HostTraffic, assert_same_weights, recording_torch_tensor, untimed
from digitlab import runtime, train
from digitlab.config import DEVICES
from digitlab.data import DigitData
from digitlab.distributed import DistContext
from digitlab.errors import DigitlabError
from digitlab.models import create_model
from digitlab.presets import get_preset, list_presets
from digitlab.train import TrainingInterrupted, fit, read_metrics

SRC = Path(__file__).resolve().parents[1] / "src" / "digitlab"



@pytest.mark.parametrize("device", [d for d in DEVICES if d != "auto"])
def test_augment_generator_is_made_on_the_training_device(device: str, monkeypatch) -> None:
    made: list[torch.device] = []

    class RecordingGenerator:
        def __init__(self, device: str | torch.device = "cpu") -> None:
            made.append(torch.device(device))

        def manual_seed(self, seed: int) -> RecordingGenerator:
            return self

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    train.augment_generator(seed=3, rank=1, device=torch.device(device))
    assert made == [torch.device(device)]


def test_no_generator_in_the_package_is_made_without_a_device() -> None:
    """`torch.Generator()` is a CPU generator: it cannot draw numbers for CUDA tensors."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not node.args and not any(k.arg == "device" for k in node.keywords)):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


def test_validation_labels_follow_the_logits_device() -> None:
    """Logits on another device than the labels (meta here, CUDA on a GPU) are compared there."""
    logits = torch.empty(8, 10, device="meta")
    loss, acc = train.loss_and_accuracy_tensors(logits, torch.arange(8) % 10)
    assert loss.device.type == acc.device.type == "meta"


def test_weight_ema_never_reads_a_count_from_the_device() -> None:
    """On meta (as on CUDA) reading a tensor's value fails (waits for the GPU): the EMA must not."""
    model = create_model("fast").to("meta")
    ema = train.build_ema(model, 0.999)
    for _ in range(3):
        ema.update_parameters(model)  # failed here with "Cannot copy out of meta tensor"
    assert int(ema.n_averaged) == 3


@pytest.mark.parametrize("preset", list_presets())
def test_a_training_step_sends_nothing_between_host_and_device(preset: str, monkeypatch) -> None:
    """Every step of every recipe (augmentation, outliers, model, loss, optimizer, schedule, EMA) on
    a device other than the CPU: `meta` here, where nothing runs, as CUDA would see it. The losses
    are read once per block (`_record_block`), which meta cannot do and is left out."""
    meta = torch.device("meta")
    monkeypatch.setattr(train, "augment_generator", lambda *args: None)  # meta has no generator of its own
    blocks: list[int] = []
    monkeypatch.setattr(train, "_record_block", lambda pending, *args: blocks.append(len(pending)))
    config = get_preset(preset).with_overrides(batch_size=16, precision="fp32")
    trainer = train._build_trainer(config, DistContext(), meta, "fp32", epoch_steps=1000)
    if config.outliers > 0:
        trainer.outlier_pool = torch.zeros(64, 28, 28, dtype=torch.uint8, device=meta)
    images = torch.zeros(96, 28, 28, dtype=torch.uint8, device=meta)
    labels = torch.zeros(96, dtype=torch.long, device=meta)
    state = train.EpochState(epoch=1, perm=torch.arange(96, device=meta))
    made: list[str] = []
    recording_torch_tensor(monkeypatch, made)
    with HostTraffic() as traffic:
        assert train.train_one_epoch(trainer, images, labels, state)
    assert state.step == train.steps_per_epoch(96, config) > 2  # the EMA averages from its second update
    assert sum(blocks) == state.step
    assert traffic.ops == [] and made == []


def test_device_description_names_the_device() -> None:
    assert runtime.device_description(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_takes_bf16_only_where_the_card_computes_it(native: bool, expected: str,
                                                                           monkeypatch) -> None:
    """torch.cuda.is_bf16_supported() also says True for cards that only emulate bf16 (T4, V100:
    Kaggle's and Colab's usual ones), where it is slower than fp32."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert runtime.resolve_precision("auto", torch.device("cuda")) == expected
    assert runtime.resolve_precision("bf16", torch.device("cuda")) == "bf16"  # asked for: taken as asked


@pytest.fixture(scope="module")
def tiny_data(mnist_train: DigitData) -> tuple[DigitData, DigitData]:
    return (mnist_train.subset(np.arange(20000, 20640), "mnist:train[20000:20640]"),
            mnist_train.subset(np.arange(30000, 30200), "mnist:train[30000:30200]"))


def _config():
    # dropout, augmentation and weight EMA: every random stream and the EMA count take part
    return get_preset("seed2017").with_overrides(epochs=2, batch_size=32, ema_decay=0.99, precision="fp32")


@pytest.mark.slow
def test_reading_losses_every_few_steps_changes_nothing(tmp_path: Path, tiny_data, monkeypatch) -> None:
    """A GPU reads the losses every 50 steps: the same weights and metrics as reading every step."""
    every_step = fit(_config(), tmp_path / "every-step", data=tiny_data)
    monkeypatch.setattr(train, "sync_interval", lambda device: 7)  # 20 steps/epoch: blocks of 7, 7, 6
    blocks = fit(_config(), tmp_path / "blocks", data=tiny_data)
    assert_same_weights(every_step.model.state_dict(), blocks.model.state_dict())
    assert untimed(read_metrics(every_step.run_dir)) == untimed(read_metrics(blocks.run_dir))
    batch_steps = [r["step"] for r in read_metrics(blocks.run_dir) if r["type"] == "batch"]
    assert batch_steps == list(range(1, 21)) * 2  # every batch is still written


@pytest.mark.slow
def test_ctrl_c_with_block_reads_stops_at_a_block_end_and_resumes_exactly(tmp_path: Path, tiny_data,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(train, "sync_interval", lambda device: 7)
    reference = fit(_config(), tmp_path / "reference", data=tiny_data)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 1 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stop:
        fit(_config(), tmp_path / "stopped", callbacks=[ctrl_c], data=tiny_data)
    assert (stop.value.epoch, stop.value.step) == (1, 7)  # the block that saw Ctrl-C is finished first
    resumed = fit(None, resume=tmp_path / "stopped", data=tiny_data)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(resumed.run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("written_on", ["cuda", None])  # None: an older checkpoint, told by its CUDA generator state
def test_a_checkpoint_resumes_only_on_the_kind_of_device_that_wrote_it(written_on: str | None, tmp_path: Path,
                                                                        tiny_data) -> None:
    """A GPU's checkpoint holds CUDA generator states and fused-Adam settings: on the CPU they would
    fail to load or, for fused Adam over channels-last weights, update the wrong moments."""
    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 1 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(_config(), tmp_path / "run", callbacks=[ctrl_c], data=tiny_data)
    path = tmp_path / "run" / "checkpoint.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    header = json.loads(metadata["digitlab"])
    assert header["info"]["device_type"] == "cpu"
    if written_on:
        header["info"]["device_type"] = written_on
    else:
        del header["info"]["device_type"]
        tensors["rng.cuda.0"] = torch.zeros(16, dtype=torch.uint8)
        header["payload_sha256"] = hashlib.sha256(save(tensors)).hexdigest()
    save_file(tensors, str(path), metadata={"digitlab": json.dumps(header)})
    with pytest.raises(DigitlabError, match="was trained on cuda and resumes only there"):
        fit(None, resume=tmp_path / "run", data=tiny_data)
