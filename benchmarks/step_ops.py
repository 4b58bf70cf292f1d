"""Operators dispatched per training step, by part of the step, for every preset: what a GPU
launches one by one with `--no-cuda-graphs` (or where graphs are not used), and what stays
outside the graphs with them.

On a GPU each operator is (about) one kernel launch of a few microseconds' host time, and the
kernels of these small networks run for about as long, so the count bounds the step time from
below whatever the card. Counted here on the CPU, with the optimizer built as on CUDA: Adam and
AdamW fused, RMSprop with its foreach (multi-tensor) kernels.

    python benchmarks/step_ops.py [--presets fast best] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import collections
import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from digitlab import train
from digitlab.distributed import DistContext
from digitlab.presets import get_preset, list_presets


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # views and detach launch nothing on a GPU
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(preset: str, batch_size: int | None) -> dict[str, int]:
    config = get_preset(preset).with_overrides(precision="bf16", batch_size=batch_size)
    trainer = train._build_trainer(config, DistContext(), torch.device("cpu"), "bf16", epoch_steps=1000)
    cuda_like = {"fused": True} if config.optimizer in ("adam", "adamw") else {"foreach": True}
    kind = type(trainer.optimizer)
    accepted = inspect.signature(kind).parameters  # AdamW's defaults hold a key its constructor refuses
    settings = {k: v for k, v in trainer.optimizer.defaults.items() if k in accepted}
    trainer.optimizer = kind(trainer.model.parameters(), **{**settings, **cuda_like})
    if config.outliers > 0:
        trainer.outlier_pool = torch.zeros(600, 28, 28, dtype=torch.uint8)
    n = config.batch_size * 4
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    parts: dict[str, int] = {}
    for step in range(3):  # the last step counts: optimizer state and the EMA exist by then
        index = torch.arange(step * config.batch_size, (step + 1) * config.batch_size)
        with _Count() as fb:
            train.forward_backward(trainer, images, labels, index)
        with _Count() as opt:
            trainer.optimizer.step()
        with _Count() as ema:
            if trainer.ema is not None:
                trainer.ema.update_parameters(trainer.bare_model)
        parts = {"forward+backward": sum(fb.ops.values()), "optimizer": sum(opt.ops.values()),
                 "ema": sum(ema.ops.values())}
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list_presets())
    parser.add_argument("--batch-size", type=int, default=None, help="default: each preset's own")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU, bf16 autocast\n")
    print("| preset | forward+backward | optimizer (as on CUDA) | EMA | eager: all | with graphs: outside them |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        parts = count(preset, args.batch_size)
        # with graphs: index copy, step replay, the optimizer, 2 decay fills + EMA replay, 2 output clones,
        # and at each replay 2 fills (seed, offset) per generator registered with the graph: the default
        # one always, the augmentation's when the recipe augments or adds outliers
        config = get_preset(preset)
        generators = 1 + (config.augment.enabled or config.outliers > 0)
        outside = 1 + 1 + 2 * generators + parts["optimizer"] + (3 + 2 if parts["ema"] else 0) + 2
        print(f"| {preset} | {parts['forward+backward']} | {parts['optimizer']} | {parts['ema']} | "
              f"{sum(parts.values())} | {outside} |", flush=True)


if __name__ == "__main__":
    main()
