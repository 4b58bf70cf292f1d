"""The training step replayed as CUDA graphs: 10-17 launches per step instead of 80-370.

A step of digitlab's small networks is 80-370 kernels of a few microseconds each (gather,
augmentation, forward, backward, optimizer, EMA; counted by benchmarks/step_ops.py). Launched one
by one from Python, the GPU waits for the host most of the time. Captured once as a CUDA graph,
the gather-to-backward part is one launch, and the EMA's update another; the optimizer steps
between them as it always does (fused Adam is one kernel already).

A captured graph repeats the very kernels it recorded, with the very arguments and addresses, so
what a graph reads must not change as a Python number or move in memory between steps: the
batch's indices are copied into one buffer, the data, weights and gradients stay put, and the
EMA's decay, which changes every step, is a device tensor refilled before each replay. The
optimizer stays outside because torch's capturable Adam turns a tensor beta1 (which the one-cycle
schedule changes every step) back into a number (`_foreach_lerp_` takes a scalar), which a graph
would freeze and which waits for the GPU. Random numbers come from generators registered with the
graph, which then draws fresh numbers at every replay and keeps the generator states (saved in
checkpoints) exact.

The first steps run eagerly on a side stream, as PyTorch's CUDA-graph notes ask (cuBLAS and cuDNN
set themselves up, the optimizer creates its state); they are real training steps, not rehearsals.

A graph must not be destroyed while another is being captured ("operation not permitted when
stream is capturing"), and Python's cycle collector may destroy an unreachable one at any moment:
torch 2.4 collected before each capture, torch 2.11 no longer does (PyTorch PR 161037). So a capture
collects first and keeps the collector off until it ends, and a finished run releases its graphs
itself (`release`) rather than leaving them to the collector.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from digitlab.errors import DigitlabError

WARMUP_STEPS = 3  # eager steps before the capture (PyTorch's whole-network example uses 3)
# Graphs are the default from the torch release they were checked with on a GPU (torch 2.11, an
# H100: the cuda tests, bit for bit against eager, and the speed figures). A failed capture cannot
# fall back to eager in the same process, so older releases train eagerly unless asked.
DEFAULT_FROM_TORCH = (2, 11)


def used_by_default(version: str = torch.__version__) -> bool:
    """Whether a run that leaves `cuda_graphs` unset replays its steps as graphs under this torch."""
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    return release >= DEFAULT_FROM_TORCH


def wanted(setting: bool | None) -> bool:
    """A config's `cuda_graphs` (True, False, or None for the default) as a wish, before asking
    `unsupported_reason` whether this run can have them."""
    return setting is True or (setting is None and used_by_default())


def unsupported_reason(device: torch.device, world_size: int) -> str | None:
    """None when training steps can be replayed as CUDA graphs here; otherwise why not."""
    if device.type != "cuda":
        return f"they need a CUDA device, and this run trains on {device.type}"
    if world_size > 1:
        return "not under torchrun (several processes): DDP's gradient exchange is not captured"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register the augmentation's generator with a graph"
    return None


class GraphedStep:
    """Calls `step` (no arguments; returns tensors) eagerly for the first `warmup` calls, then
    captures it once as a CUDA graph and replays that. Returns the step's output tensors, which
    stay valid after later calls. On a device other than CUDA, every call is eager.

    `step` must read only tensors that stay at their addresses and numbers that never change
    (see the module's notes); `generators` are the non-default CUDA generators it draws from.
    A failed capture stops training with a DigitlabError: torch leaves the stream and the
    generators in capture mode after one, so no eager step can follow in this process.
    """

    def __init__(self, step: Callable[[], Sequence[torch.Tensor]], device: torch.device,
                 generators: Sequence[torch.Generator] = (), warmup: int = WARMUP_STEPS) -> None:
        self.step = step
        self.device = device
        self.generators = list(generators)
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Sequence[torch.Tensor] = ()
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self) -> list[torch.Tensor]:
        self.calls += 1
        if self.side_stream is None:
            return list(self.step())
        if self.graph is None and self.calls > self.warmup:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return [t.clone() for t in self.outputs]
        return self._eager()

    def _eager(self) -> list[torch.Tensor]:
        assert self.side_stream is not None
        main = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            outputs = list(self.step())
        main.wait_stream(self.side_stream)
        for t in outputs:  # made on the side stream, read on the main one
            t.record_stream(main)
        return outputs

    def release(self) -> None:
        """Free the graph and its outputs now, and drop the step (often a bound method of the
        object that owns this one: a reference cycle only the collector would break)."""
        self.graph, self.outputs = None, ()
        self.step = _released

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # the default generator is registered by the capture itself
            graph.register_generator_state(generator)
        gc.collect()  # an unreachable graph of an earlier run goes now, not in the middle of the capture
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                outputs = list(self.step())
        except RuntimeError as exc:
            # the error that broke the capture; capture_end's own ("operation failed due to a previous
            # error during capture") follows it
            cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
            first_line = (str(cause).splitlines() or [""])[0]
            raise DigitlabError(
                f"CUDA graph capture failed ({type(cause).__name__}: {first_line}); train with --no-cuda-graphs "
                "(same results, slower): start the run again with it, or resume it with --no-cuda-graphs if it "
                "saved a checkpoint; rerun an ensemble or `digitlab kaggle` with --no-cuda-graphs"
            ) from exc
        finally:
            if collecting:
                gc.enable()
        self.graph, self.outputs = graph, outputs


def _released() -> Sequence[torch.Tensor]:
    raise RuntimeError("this graphed step was released")
