"""`--cuda-graphs` checked without a GPU: the code that CUDA graphs capture runs here eagerly, as
the graphs would replay it. What replay needs is checked op by op: consecutive calls must dispatch
the same operators with the same numbers and read every outside tensor at the same address (a
decay passed as a number, or a fresh index tensor, fails here). The capture itself is checked on a
GPU by tests/test_cuda.py.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from device_helpers import HostTraffic, assert_same_weights, bars, recording_torch_tensor, untimed
from digitlab import cudagraph, train
from digitlab.config import TrainConfig
from digitlab.cudagraph import GraphedStep, unsupported_reason
from digitlab.distributed import DistContext
from digitlab.errors import DigitlabError
from digitlab.presets import get_preset, list_presets
from digitlab.train import TrainingInterrupted, fit, read_metrics


@pytest.fixture
def graphs_here(monkeypatch) -> None:
    """Let a run on the CPU (or meta) take the graph path: its steps then run eagerly."""
    monkeypatch.setattr(train, "unsupported_reason", lambda *args: None)


@pytest.mark.parametrize(("device", "world", "expected"), [
    ("cuda", 1, None if hasattr(torch.cuda.CUDAGraph, "register_generator_state") else "cannot register"),
    ("cpu", 1, "need a CUDA device"),
    ("cuda", 2, "torchrun"),
])
def test_graphs_are_used_only_where_a_step_can_be_replayed(device: str, world: int, expected: str | None) -> None:
    why = unsupported_reason(torch.device(device), world)
    assert why is None if expected is None else expected in why


def test_a_graphed_step_off_cuda_calls_the_step_every_time() -> None:
    calls: list[int] = []

    def step() -> list[torch.Tensor]:
        calls.append(1)
        return [torch.tensor(float(len(calls)))]

    graphed = GraphedStep(step, torch.device("cpu"), warmup=1)
    assert [float(graphed()[0]) for _ in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert graphed.graph is None


class _Trace(TorchDispatchMode):
    """Each op with what a CUDA graph would freeze: its non-tensor arguments, and the address of
    every tensor that the step did not make itself (storage pointers, so views count as their base)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, ...]] = []
        self.made: set[int] = set()
        self.outside: set[int] = set()

    def _describe(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            ptr = value.untyped_storage().data_ptr()
            if ptr not in self.made:
                self.outside.add(ptr)
            where = ("outside", ptr) if ptr in self.outside else ("made",)
            return (*where, tuple(value.shape), value.dtype)
        if isinstance(value, torch.Generator):
            return ("generator", value.device, value.initial_seed())  # a new Python object at every call
        if value is None or isinstance(value, int | float | complex | str | torch.device | torch.dtype
                                       | torch.memory_format | torch.layout):
            return value
        return type(value).__name__  # e.g. the profiler's record_function handles around optimizer.step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [self._describe(v) for v in tree_flatten((args, kwargs))[0]]
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.outside:
                self.made.add(t.untyped_storage().data_ptr())
        self.ops.append((str(func), *inputs))
        return out


def _trainer_and_data(preset: str, graphs: bool, device: str = "cpu"):
    config = get_preset(preset).with_overrides(batch_size=16, precision="fp32")
    dev = torch.device(device)
    trainer = train._build_trainer(config, DistContext(), dev, "fp32", epoch_steps=100, graphs=graphs)
    if config.outliers > 0:
        trainer.outlier_pool = torch.zeros(64, 28, 28, dtype=torch.uint8, device=dev)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (160, 28, 28), dtype=torch.uint8, generator=gen).to(dev)
    labels = torch.randint(0, 10, (160,), generator=gen).to(dev)
    return trainer, images, labels


def _traced(calls: list[list[tuple]], function):
    def traced():
        with _Trace() as trace:
            out = function()
        calls.append(trace.ops)
        return out
    return traced


@pytest.mark.parametrize("preset", list_presets())
def test_consecutive_steps_are_the_same_kernels_on_the_same_memory(preset: str) -> None:
    """The property a CUDA graph's replay rests on, for every recipe's step and EMA update: what
    changes from one step to the next (the batch, the random numbers, the EMA's decay) changes only
    inside tensors whose addresses stay put."""
    trainer, images, labels = _trainer_and_data(preset, graphs=True)
    replay = train.StepReplay(trainer, images, labels)
    steps: list[list[tuple]] = []
    updates: list[list[tuple]] = []
    replay.step_graph.step = _traced(steps, replay.step_graph.step)
    replay.ema_graph.step = _traced(updates, replay.ema_graph.step)
    for k in range(4):
        replay(torch.arange(16 * k, 16 * (k + 1)))
        if trainer.scheduler is not None:
            trainer.scheduler.step()
    assert len(steps) == 4 and steps[0] == steps[1] == steps[2] == steps[3]
    if trainer.ema is not None:
        assert len(updates) == 4 and updates[0] == updates[1] == updates[2] == updates[3]
        assert int(trainer.ema.n_averaged) == 4


def test_the_eager_ema_update_would_not_replay() -> None:
    """The same check fails for the eager EMA update, whose decay is a Python number that changes
    every step: the check can fail."""
    trainer, _, _ = _trainer_and_data("best", graphs=False)
    assert trainer.ema is not None
    updates: list[list[tuple]] = []
    for _ in range(3):
        _traced(updates, lambda: trainer.ema.update_parameters(trainer.bare_model))()
    assert updates[1] != updates[2]


@pytest.mark.parametrize("preset", list_presets())
def test_a_replayable_step_sends_nothing_between_host_and_device(preset: str, graphs_here, monkeypatch) -> None:
    """As test_device's check of the eager step: on `meta`, as CUDA would see it, filling the
    EMA's decay tensors and the batch's index buffer moves nothing between host and device."""
    monkeypatch.setattr(train, "augment_generator", lambda *args: None)  # meta has no generator of its own
    monkeypatch.setattr(train, "_record_block", lambda pending, *args: None)
    trainer, _, _ = _trainer_and_data(preset, graphs=True, device="meta")
    images = torch.zeros(160, 28, 28, dtype=torch.uint8, device="meta")
    labels = torch.zeros(160, dtype=torch.long, device="meta")
    state = train.EpochState(epoch=1, perm=torch.arange(160, device="meta"))
    made: list[str] = []
    recording_torch_tensor(monkeypatch, made)
    with HostTraffic() as traffic:
        assert train.train_one_epoch(trainer, images, labels, state)
    assert isinstance(trainer.replay, train.StepReplay) and state.step == train.steps_per_epoch(160, trainer.config)
    assert traffic.ops == [] and made == []


def _graph_config(preset: str = "best") -> TrainConfig:
    return get_preset(preset).with_overrides(epochs=2, batch_size=32, precision="fp32", device="cpu",
                                             cuda_graphs=True)


@pytest.mark.parametrize("preset", ["best", "seed2017"])
def test_the_graph_path_trains_exactly_as_the_eager_one(preset: str, tmp_path: Path, graphs_here) -> None:
    """Same weights and metrics, bit for bit, with and without the graph path's form of the step
    (EMA decay in tensors, gradients left for the optimizer): on a GPU, graphs change the speed only.
    `best` has the EMA and one-cycle's moving betas, `seed2017` RMSprop and dropout."""
    data = (bars(1024, 0), bars(256, 1))
    graphed = fit(_graph_config(preset), tmp_path / "graphed", data=data, progress=False)
    eager = fit(_graph_config(preset).with_overrides(cuda_graphs=False), tmp_path / "eager", data=data,
                progress=False)
    assert graphed.final["val_acc"] > 0.25  # learning: chance is 0.1
    assert_same_weights(eager.model.state_dict(), graphed.model.state_dict())
    assert untimed(read_metrics(eager.run_dir)) == untimed(read_metrics(graphed.run_dir))
    assert json.loads((graphed.run_dir / "config.json").read_text())["resolved"]["cuda_graphs"] is True


@pytest.mark.slow
@pytest.mark.parametrize(("stop_epoch", "stop_step", "graphs_after"), [
    (1, 13, None),  # the resumed run captures its graphs afresh (eager steps, then a capture)
    (2, 5, False),  # it goes on without them (after a failed capture, say): graphs change the speed only
])
def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(stop_epoch: int, stop_step: int,
                                                                graphs_after: bool | None, tmp_path: Path,
                                                                graphs_here) -> None:
    data = (bars(1024, 0), bars(256, 1))
    reference = fit(_graph_config(), tmp_path / "reference", data=data, progress=False)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == stop_epoch and event["step"] == stop_step:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(_graph_config(), tmp_path / "stopped", callbacks=[ctrl_c], data=data, progress=False)
    resumed = fit(None, resume=tmp_path / "stopped", data=data, progress=False, cuda_graphs=graphs_after)
    assert_same_weights(reference.model.state_dict(), resumed.model.state_dict())
    assert untimed(read_metrics(reference.run_dir)) == untimed(read_metrics(resumed.run_dir))
    # config.json follows the latest choice, so that a later resume (and its printed command) keeps it
    record = json.loads((tmp_path / "stopped" / "config.json").read_text())
    expected = True if graphs_after is None else graphs_after
    assert record["config"]["cuda_graphs"] is expected and record["resolved"]["cuda_graphs"] is expected


def test_a_resume_records_what_the_default_resolves_to_there(tmp_path: Path, graphs_here, monkeypatch) -> None:
    """Started eagerly by default (say under torch 2.10), resumed where the default is graphs: the
    config still says "where usable" (null), and `resolved` says what the resumed run does."""
    config = dataclasses.replace(_graph_config("fast").with_overrides(epoch_fraction=1.0), cuda_graphs=None)
    data = (bars(512, 0), bars(128, 1))
    monkeypatch.setattr(cudagraph, "used_by_default", lambda: False)

    def stop_after_epoch_1(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(config, tmp_path / "run", callbacks=[stop_after_epoch_1], data=data, progress=False)
    assert _default_graphs(tmp_path / "run") == (None, False)
    monkeypatch.setattr(cudagraph, "used_by_default", lambda: True)
    fit(None, resume=tmp_path / "run", data=data, progress=False)
    assert _default_graphs(tmp_path / "run") == (None, True)


def test_resume_takes_the_graphs_flag_and_no_other(tmp_path: Path, capsys) -> None:
    from digitlab.cli import main

    config = get_preset("fast").with_overrides(epochs=2, epoch_fraction=1.0, batch_size=32, precision="fp32",
                                               device="cpu")
    run = tmp_path / "run"

    def stop_after_epoch_1(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    data = (bars(512, 0), bars(128, 1))
    with pytest.raises(TrainingInterrupted):
        fit(config, run, callbacks=[stop_after_epoch_1], data=data, progress=False)
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    assert "--resume continues the run with its own settings; drop --lr" in capsys.readouterr().err
    seen = {}

    def fake_fit(config, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    import digitlab.train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digitlab.train, "fit", fake_fit)
        assert main(["train", "--resume", str(run), "--no-cuda-graphs"]) == 130
    assert seen["cuda_graphs"] is False and seen["resume"] == run


def test_a_failed_capture_stops_with_its_cause(monkeypatch) -> None:
    """torch leaves the stream and generators in capture mode after a failed capture, so training
    cannot go on eagerly in that process: it stops, naming the error that broke the capture
    (not capture_end's "operation failed due to a previous error") and what to do."""

    class FakeGraph:
        def register_generator_state(self, generator) -> None:
            pass

    @contextmanager
    def failing_capture(graph):
        try:
            yield
        finally:
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)

    def step() -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    graphed = GraphedStep(step, torch.device("cpu"), warmup=0)
    graphed.side_stream = object()  # as on CUDA: capture after the warm-up calls
    with pytest.raises(DigitlabError, match=r"^CUDA graph capture failed \(RuntimeError: CUDA error: operation not "
                       r"permitted when stream is capturing\); train with --no-cuda-graphs \(same results, slower\): "
                       r"start the run again with it, or resume it with --no-cuda-graphs if it saved a checkpoint"):
        graphed()


def test_no_garbage_is_collected_during_a_capture(monkeypatch) -> None:
    """Python's collector destroying an unreachable graph of an earlier run in the middle of a
    capture breaks it ("operation not permitted when stream is capturing"); torch 2.11's capture no
    longer collects beforehand. The capture collects first, keeps the collector off while it runs,
    and turns it back on after, also after a failed capture."""
    seen: list[tuple[str, bool]] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: seen.append(("collect", gc.isenabled())) or collect(*a))

    class FakeGraph:
        def register_generator_state(self, generator) -> None:
            pass

        def replay(self) -> None:
            pass

    @contextmanager
    def capture(graph):
        seen.append(("capture", gc.isenabled()))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    graphed = GraphedStep(lambda: [torch.ones(1)], torch.device("cpu"), warmup=0)
    graphed.side_stream = object()  # as on CUDA: capture after the warm-up calls
    assert gc.isenabled()
    graphed()
    assert seen == [("collect", True), ("capture", False)] and gc.isenabled()

    def failing() -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: out of memory")

    broken = GraphedStep(failing, torch.device("cpu"), warmup=0)
    broken.side_stream = object()
    with pytest.raises(DigitlabError, match="CUDA graph capture failed"):
        broken()
    assert gc.isenabled()


def test_a_finished_run_frees_its_replayed_steps_without_the_collector(tmp_path: Path, graphs_here,
                                                                      monkeypatch) -> None:
    """The graphs (GPU memory) go when the run ends, not at some later collection that might fall
    in the middle of the next run's capture: nothing of the run's StepReplay is kept in a cycle."""
    made: list[weakref.ref] = []

    class Recorded(train.StepReplay):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(weakref.ref(self))

    monkeypatch.setattr(train, "StepReplay", Recorded)
    gc.collect()
    gc.disable()
    try:
        fit(_graph_config("best").with_overrides(epochs=1), tmp_path / "run", data=(bars(256, 0), bars(64, 1)),
            progress=False)
        assert len(made) == 1 and made[0]() is None
    finally:
        gc.enable()


def _default_graphs(run_dir: Path) -> tuple[object, object]:
    record = json.loads((run_dir / "config.json").read_text())
    return record["config"]["cuda_graphs"], record["resolved"]["cuda_graphs"]


@pytest.mark.parametrize(("version", "expected"), [
    ("2.4.1+cu121", False), ("2.10.1", False), ("2.11.0+cu130", True), ("2.12.0a0+git1234", True),
    ("2.13.0+cpu", True), ("3.0.0", True),
])
def test_graphs_are_the_default_from_the_torch_release_checked_on_a_gpu(version: str, expected: bool) -> None:
    assert cudagraph.used_by_default(version) is expected


@pytest.mark.parametrize("new_enough", [True, False])
def test_by_default_graphs_are_used_wherever_they_can_be(new_enough: bool, tmp_path: Path, graphs_here,
                                                          monkeypatch, caplog) -> None:
    """No flag: graphs where `unsupported_reason` allows (here forced, as on one CUDA GPU) under a
    torch the graphs were checked with; eager, in silence, under an older one. The config keeps
    "where usable" (null), so the same run resumed elsewhere trains eagerly in silence."""
    monkeypatch.setattr(cudagraph, "used_by_default", lambda: new_enough)
    config = _graph_config("fast").with_overrides(epochs=1, epoch_fraction=1.0)
    config = dataclasses.replace(config, cuda_graphs=None)
    assert get_preset("fast").cuda_graphs is None and TrainConfig().cuda_graphs is None
    with caplog.at_level(logging.WARNING, logger="digitlab.train"):
        run = fit(config, tmp_path / "run", data=(bars(512, 0), bars(128, 1)), progress=False)
    assert _default_graphs(run.run_dir) == (None, new_enough)
    assert caplog.text == ""


def test_by_default_a_run_where_graphs_cannot_be_used_trains_eagerly_in_silence(tmp_path: Path, monkeypatch,
                                                                                 caplog) -> None:
    monkeypatch.setattr(cudagraph, "used_by_default", lambda: True)  # the CPU, not the torch release, says no
    config = get_preset("fast").with_overrides(epochs=1, epoch_fraction=1.0, batch_size=32, precision="fp32",
                                               device="cpu")
    with caplog.at_level(logging.WARNING, logger="digitlab.train"):
        run = fit(config, tmp_path / "run", data=(bars(512, 0), bars(128, 1)), progress=False)
    assert caplog.text == ""
    assert _default_graphs(run.run_dir) == (None, False)


def test_asking_for_graphs_where_there_are_none_trains_as_without(tmp_path: Path, caplog) -> None:
    data = (bars(512, 0), bars(128, 1))
    plain = get_preset("fast").with_overrides(epochs=1, epoch_fraction=1.0, batch_size=32, precision="fp32",
                                              device="cpu")
    with caplog.at_level(logging.WARNING, logger="digitlab.train"):
        asked = fit(plain.with_overrides(cuda_graphs=True), tmp_path / "asked", data=data, progress=False)
    assert "--cuda-graphs: not used, they need a CUDA device" in caplog.text
    for record in (json.loads((asked.run_dir / name).read_text()) for name in ("config.json", "model.json")):
        assert record["config"]["cuda_graphs"] is None  # said once; from now on "where usable"
    assert _default_graphs(asked.run_dir) == (None, False)
    reference = fit(plain, tmp_path / "plain", data=data, progress=False)
    assert_same_weights(reference.model.state_dict(), asked.model.state_dict())


def test_cuda_graphs_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(DigitlabError, match="cuda_graphs must be true, false or null"):
        get_preset("fast").with_overrides(cuda_graphs="yes").validate()
    with pytest.raises(DigitlabError, match="cuda_graphs must be true, false or null"):  # "no" would be truthy
        fit(get_preset("fast"), tmp_path / "run", data=(bars(512, 0), bars(128, 1)), cuda_graphs="no")
    assert not (tmp_path / "run").exists()


def test_an_ensemble_rerun_applies_its_graphs_setting_to_the_members_it_resumes(tmp_path: Path) -> None:
    from digitlab.ensemble import MemberPlan, _member_command, _recipe_record

    started = MemberPlan(0, 7, tmp_path / "member-0")
    (started.run_dir).mkdir()
    (started.run_dir / "checkpoint.safetensors").write_bytes(b"")  # what makes a member "started"
    assert started.started
    assert _member_command(tmp_path / "c.json", started, cuda_graphs=True)[-1] == "--cuda-graphs"
    assert _member_command(tmp_path / "c.json", started, cuda_graphs=False)[-1] == "--no-cuda-graphs"
    # neither flag on the rerun: each member keeps its own setting
    assert _member_command(tmp_path / "c.json", started, cuda_graphs=None)[-2:] == ["--resume", str(started.run_dir)]
    assert "cuda_graphs" not in _recipe_record(get_preset("best").with_overrides(cuda_graphs=True))
