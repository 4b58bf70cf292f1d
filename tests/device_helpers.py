"""What the device tests share: checks for what would move data between host and device on
CUDA, data that a few steps already learn, metrics without their timing fields, and the
bit-for-bit comparison of two models' weights.

(A plain module, not a test file: `tests/` is on sys.path when pytest runs, whichever way it is started.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from digitlab.data import DigitData

TIMING_FIELDS = {"train_seconds", "images_per_s", "eval_seconds"}


def untimed(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without the fields that measure time (they differ run to run)."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_same_weights(a: Mapping[str, torch.Tensor] | Path, b: Mapping[str, torch.Tensor] | Path) -> None:
    """Two state dicts, or two safetensors files, hold the same tensors bit for bit; names the ones that differ."""
    wa = load_file(str(a)) if isinstance(a, Path) else a
    wb = load_file(str(b)) if isinstance(b, Path) else b
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def bars(n: int, seed: int) -> DigitData:
    """Class c: a bright horizontal bar on rows 2c+4..2c+6, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for c in range(10):
        images[labels == c, 2 * c + 4 : 2 * c + 7, 4:24] = 255
    return DigitData(images, labels, f"bars:{seed}")


class HostTraffic(TorchDispatchMode):
    """Records every op that touches host (CPU) tensors and device tensors at once. On CUDA each
    is a copy between the two, and a copy from ordinary host memory makes the CPU wait for the
    card. Tensors built from Python data on a device (`torch.tensor(..., device=d)`) are copies
    too but do not pass through this mode: `recording_torch_tensor` catches those."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if len({t.device.type for t in tensors} | {"cpu"}) > 1 and any(t.device.type == "cpu" for t in tensors):
            self.ops.append(str(func))
        return out


def recording_torch_tensor(monkeypatch, made: list[str]) -> None:
    real = torch.tensor

    def tensor(data, *args, **kwargs):
        t = real(data, *args, **kwargs)
        if t.device.type != "cpu":
            made.append(f"torch.tensor({data!r}) on {t.device}")
        return t

    monkeypatch.setattr(torch, "tensor", tensor)
