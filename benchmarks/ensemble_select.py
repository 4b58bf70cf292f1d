"""Choose an ensemble of finished runs on the validation split they share, then measure it once
on the MNIST test set (issue 11 §3): members that differ in architecture and augmentation.

Every run must have been trained on MNIST's training set with the same held-out split (the
same `val_split` and split seed, e.g. `"split_seed": 0` in each config), so that no member saw
the validation images (`digitlab.ensemble.shared_validation` checks it). The composition is chosen on those images only:

- `all`: every run, equal weights (no choice at all);
- `greedy`: forward selection with replacement (Caruana et al. 2004, what `digitlab ensemble
  --weights greedy` does): start empty, add the run that most lowers the ensemble's validation
  log-loss (after temperature scaling: label-smoothed nets are under-confident), stop after
  `--max-members` picks or when no pick helps; a run picked twice counts twice.

The test set is read after the choice, for the table only.

    python benchmarks/ensemble_select.py RUN_DIR ... [--select all greedy] [--max-members 10]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from digitlab.data import load_source
from digitlab.ensemble import calibrated_nll as log_loss
from digitlab.ensemble import forward_selection, shared_validation
from digitlab.inference import load_predictor, tta_proba


def errors(probs: np.ndarray, labels: np.ndarray) -> int:
    return int((probs.argmax(1) != labels).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--select", nargs="+", choices=("all", "greedy"), default=["all", "greedy"])
    parser.add_argument("--max-members", type=int, default=10)
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--test", default="mnist:test", help="test source (default: mnist:test; "
                        "idx:DIR:test where the wheel is not installed)")
    parser.add_argument("--device", default="cpu", help="where the members run: cpu, cuda, auto")
    args = parser.parse_args()

    val = shared_validation(args.runs)
    val_images, val_labels = val.images, val.require_labels("validation needs labels")
    predictors = [load_predictor(r, device=args.device, calibrated=False) for r in args.runs]
    val_probs = np.stack([p.predict_proba(val_images) for p in predictors])
    test = load_source(args.test)
    test.require_labels("the test set needs labels")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; {len(val_labels):,} shared validation "
          f"images; test {args.test}, {len(test):,} images\n")

    test_probs = np.stack([p.predict_proba(test.images) for p in predictors])
    test_tta = None if args.no_tta else np.stack([tta_proba(p, test.images) for p in predictors])
    print("| run | val errors | val log-loss (temperature-scaled) | test accuracy | test errors |")
    print("|---|---:|---:|---:|---:|")
    for run, vp, tp in zip(args.runs, val_probs, test_probs, strict=True):
        print(f"| {run.name} | {errors(vp, val_labels)} | {log_loss(vp, val_labels):.4f} | "
              f"{100 * (1 - errors(tp, test.labels) / len(tp)):.2f}% | {errors(tp, test.labels)} |")

    choices = {"all": list(range(len(args.runs)))}
    if "greedy" in args.select:
        choices["greedy"] = forward_selection(val_probs, val_labels, args.max_members)
    print("\n| ensemble (chosen on validation) | members | val errors | val log-loss | test accuracy | "
          "test errors | with TTA |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.select:
        idx = choices[name]
        vp, tp = val_probs[idx].mean(0), test_probs[idx].mean(0)
        tta = "-" if test_tta is None else f"{100 * (1 - errors(test_tta[idx].mean(0), test.labels) / len(test)):.2f}%"
        names = ", ".join(args.runs[i].name for i in idx)
        print(f"| {name} | {names} | {errors(vp, val_labels)} | {log_loss(vp, val_labels):.4f} | "
              f"{100 * (1 - errors(tp, test.labels) / len(tp)):.2f}% | {errors(tp, test.labels)} | {tta} |")
    wrong = (test_probs.argmax(2) != test.labels[None]).sum(0)
    print(f"\ntest images misread by at least one run: {int((wrong > 0).sum())}, "
          f"by all {len(args.runs)}: {int((wrong == len(args.runs)).sum())}")


if __name__ == "__main__":
    main()
