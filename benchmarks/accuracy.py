"""Accuracy table on the official MNIST test set: preset x (test accuracy, errors / 10,000,
training minutes), with and without test-time augmentation, and an ensemble's accuracy vs N.

Every model is trained on the 60,000 training images only; the test set is used for this
table, never to choose anything. Runs already in RUNS_DIR are reused; missing ones are trained.

    python benchmarks/accuracy.py --runs-dir runs/bench [--presets seed2017 fast best]
                                  [--members 5] [--jobs 1] [--no-train]
    python benchmarks/accuracy.py --runs-dir runs/bench --presets --members 0 --runs RUN_DIR ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from digitlab.data import load_mnist
from digitlab.ensemble import train_ensemble
from digitlab.inference import ensemble_members, is_ensemble, load_predictor, tta_proba
from digitlab.presets import get_preset
from digitlab.train import fit


def train_minutes(run_dir: Path) -> float:
    meta = json.loads((run_dir / "model.json").read_text())
    return meta["train_seconds"] / 60


def ensure_run(run_dir: Path, preset: str, allow_train: bool) -> Path | None:
    if (run_dir / "model.json").is_file():
        return run_dir
    if not allow_train:
        return None
    resume = run_dir if (run_dir / "checkpoint.safetensors").is_file() else None
    config = None if resume else get_preset(preset).with_overrides(val_split=0.0)
    fit(config, None if resume else run_dir, resume=resume)
    return run_dir


def row(name: str, probs: np.ndarray, labels: np.ndarray, minutes: float, tta: np.ndarray | None) -> str:
    errors = int((probs.argmax(1) != labels).sum())
    cells = f"| {name} | {100 * (1 - errors / len(labels)):.2f}% | {errors} | {minutes:.1f} |"
    if tta is not None:
        tta_errors = int((tta.argmax(1) != labels).sum())
        cells += f" {100 * (1 - tta_errors / len(labels)):.2f}% | {tta_errors} |"
    else:
        cells += " - | - |"
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--presets", nargs="*", default=["seed2017", "fast", "best"])
    parser.add_argument("--members", type=int, default=5, help="ensemble size (0: none)")
    parser.add_argument("--ensemble-preset", default="best", help="preset of the ensemble members")
    parser.add_argument("--jobs", type=int, default=1, help="ensemble members trained at once")
    parser.add_argument("--no-train", action="store_true", help="only measure runs that already exist")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--runs", nargs="+", type=Path, default=[],
                        help="finished run folders (any presets, trained on mnist:train only) to average "
                             "in the given order: the curve by N of a mixed ensemble")
    args = parser.parse_args()

    test = load_mnist("test")
    labels = test.labels
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; MNIST test set, 10,000 images\n")
    print("| model | test accuracy | errors / 10,000 | train minutes | with TTA | errors with TTA |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        run = ensure_run(args.runs_dir / preset, preset, not args.no_train)
        if run is None:
            print(f"| {preset} | not trained | | | | |")
            continue
        predictor = load_predictor(run)
        probs = predictor.predict_proba(test.images)
        tta = None if args.no_tta else tta_proba(predictor, test.images)
        print(row(preset, probs, labels, train_minutes(run), tta), flush=True)

    if args.runs:
        curve(args.runs, [train_minutes(r) for r in args.runs], test.images, labels, not args.no_tta,
              "the given runs")
    if args.members:
        folder = args.runs_dir / f"ensemble-{args.ensemble_preset}"
        if not is_ensemble(folder) and not args.no_train:
            config = get_preset(args.ensemble_preset).with_overrides(val_split=0.0)
            train_ensemble(config, folder, args.members, jobs=args.jobs)
        if is_ensemble(folder):
            members = ensemble_members(folder)
            curve(members, [train_minutes(m) for m in members], test.images, labels, not args.no_tta,
                  f"`{args.ensemble_preset}` members")


def curve(runs: list[Path], minutes: list[float], images: np.ndarray, labels: np.ndarray, with_tta: bool,
          what: str) -> None:
    """Accuracy of the mean of the first N runs' probabilities, N = 1..len(runs), in the given order."""
    members = np.stack([load_predictor(r).predict_proba(images) for r in runs])  # (M, N, 10)
    tta_members = np.stack([tta_proba(load_predictor(r), images) for r in runs]) if with_tta else None
    print(f"\nensemble of {what}, accuracy vs N (mean of the first N members' probabilities):\n")
    print("| members | test accuracy | errors / 10,000 | train minutes (sum) | with TTA | errors with TTA |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in range(1, len(members) + 1):
        tta = None if tta_members is None else tta_members[:n].mean(0)
        print(row(f"N={n} (+{runs[n - 1].name})", members[:n].mean(0), labels, sum(minutes[:n]), tta), flush=True)
    singles = [(m.argmax(1) == labels).mean() for m in members]
    print(f"\nsingle members: {', '.join(f'{100 * a:.2f}%' for a in singles)} "
          f"(mean {100 * np.mean(singles):.2f}%)")
    # how much the members agree on their mistakes: errors all of them make, averaging cannot fix
    wrong_count = (members.argmax(2) != labels[None]).sum(0)
    ensemble_wrong = members.mean(0).argmax(1) != labels
    n = len(members)
    print(f"test images misread by at least one member: {int((wrong_count > 0).sum())}, "
          f"by at least half: {int((wrong_count >= (n + 1) // 2).sum())}, by all {n}: "
          f"{int((wrong_count == n).sum())} (of the ensemble's {int(ensemble_wrong.sum())} errors, "
          f"{int((ensemble_wrong & (wrong_count == n)).sum())} are misread by every member)")

if __name__ == "__main__":
    main()
