"""Training throughput of whole recipes through `fit` (the real loop: augmentation, EMA,
per-batch metrics, checkpoints) on one device, usually a GPU: images/s of the last epoch
(compilation and warm-up fall in the first), training seconds for all epochs, and test accuracy.

    python benchmarks/gpu_speed.py --train idx:mnist-idx --test idx:mnist-idx:test \
        [--runs seed2017:3 best:15 fast:1 fast-long:5] [--device cuda] [--seed 0] [--no-cuda-graphs]

The training clock counts optimisation only (evaluation excluded) and is read after the
device has finished each block of steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from digitlab.cudagraph import unsupported_reason, wanted
from digitlab.data import load_source
from digitlab.presets import get_preset
from digitlab.runtime import resolve_device
from digitlab.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["seed2017:3", "best:15"],
                        help="PRESET:EPOCHS (the schedule spans the epochs given)")
    parser.add_argument("--train", default="mnist:train")
    parser.add_argument("--test", default="mnist:test")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each training step as CUDA graphs (default: where they can be used)")
    args = parser.parse_args()
    data = (load_source(args.train), load_source(args.test))
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    used = wanted(args.cuda_graphs) and unsupported_reason(device, 1) is None
    print(f"torch {torch.__version__}, {device} ({card}), {'CUDA graphs' if used else 'eager'}\n")
    print("| preset | epochs | images/s (last epoch) | train s (all epochs) | wall s | test acc |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.runs:
        preset, _, epochs = spec.partition(":")
        config = get_preset(preset).with_overrides(
            epochs=int(epochs) if epochs else None, seed=args.seed, val_split=0.0, device=args.device,
            cuda_graphs=args.cuda_graphs)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = fit(config, os.path.join(tmp, "run"), data=data, progress=False)
            wall = time.perf_counter() - t0
        last = result.history[-1]
        print(f"| {preset} | {config.epochs} | {last['images_per_s']:,.0f} | {result.train_seconds:.1f} | "
              f"{wall:.1f} | {100 * last['val_acc']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
