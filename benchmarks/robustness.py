"""Accuracy of trained runs under corruptions (MNIST-C-style plus real-writing variations).

Prints one row per corruption, a column per run folder, then the clean accuracy and the mean
over corruptions. The corrupted images depend only on --seed, so every run sees the same ones.

    python benchmarks/robustness.py RUN_DIR [RUN_DIR ...] [--limit 2000] [--seed 0]
    python benchmarks/robustness.py RUN_DIR --validation --seed 1000   # choose recipes here

--validation scores each run on its own held-out split (recomputed from its config.json), so
recipes are chosen without looking at MNIST test; use a seed other than the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from digitlab.corruptions import corrupt, list_corruptions
from digitlab.data import load_source
from digitlab.errors import DigitlabError
from digitlab.inference import load_predictor
from digitlab.overlap import validation_data


def validation_split(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images a run held out for validation, rebuilt from its config."""
    data = validation_data(run_dir)
    if data is None:
        raise DigitlabError(f"{run_dir}: trained without a validation split; --validation needs one")
    return data.images, data.require_labels()


def subset(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(labels):
        return images, labels
    # an even spread over the set, not its first digits
    idx = np.linspace(0, len(labels) - 1, limit).astype(int)
    return images[idx], labels[idx]


def robustness(run_dir: Path, images: np.ndarray, labels: np.ndarray, corruptions: list[str],
               seed: int) -> dict[str, float]:
    """Accuracy (%) on clean images and under each corruption, plus their mean ('mean')."""
    predictor = load_predictor(run_dir)

    def accuracy(x: np.ndarray) -> float:
        return float(100 * (predictor.predict_proba(x).argmax(1) == labels).mean())

    scores = {"clean": accuracy(images)}
    for i, name in enumerate(corruptions):
        # a different stream per corruption, the same for every run
        scores[name] = accuracy(corrupt(images, name, seed * 1000 + i))
    scores["mean"] = float(np.mean([scores[name] for name in corruptions]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (or ensemble folders)")
    parser.add_argument("--data", default="mnist:test", help="labelled source (default: mnist:test)")
    parser.add_argument("--validation", action="store_true", help="use each run's own validation split")
    parser.add_argument("--limit", type=int, default=None, help="evaluate an even spread of N images")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed (default: 0)")
    parser.add_argument("--corruptions", nargs="*", default=None, help="subset (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args()
    corruptions = args.corruptions or list_corruptions()

    results: dict[str, dict[str, float]] = {}
    try:
        if not args.validation:
            data = load_source(args.data)
            test = subset(data.images, data.labels, args.limit)
        for run in args.runs:
            images, labels = subset(*validation_split(run), args.limit) if args.validation else test
            t0 = time.perf_counter()
            results[str(run)] = robustness(run, images, labels, corruptions, args.seed)
            print(f"{run}: {len(labels)} images, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    except DigitlabError as exc:
        sys.exit(f"error: {exc}")

    names = [run.name for run in args.runs]
    print("| corruption | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for key in ["clean", *corruptions, "mean"]:
        label = f"**{key}**" if key in ("clean", "mean") else key
        print(f"| {label} | " + " | ".join(f"{results[str(r)][key]:.2f}" for r in args.runs) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
