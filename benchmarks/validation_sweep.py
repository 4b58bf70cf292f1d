"""Compare recipe variants on a validation split of the MNIST training set (the test set is
never touched): how the presets' hyper-parameters were chosen.

The 60,000 training images are split (stratified, seed 0) into 50,000 for training and
10,000 for validation. Each variant is a JSON object of TrainConfig overrides, plus two
conveniences: "preset" (default: fast) and "images" (images per epoch, turned into an
epoch_fraction of the 50,000). One line per variant: validation accuracy per seed, mean,
and training seconds (only comparable between runs on an otherwise idle machine).

    python benchmarks/validation_sweep.py '{"images": 36000, "lr": 0.01}' '{"lr": 0.006}'
    python benchmarks/validation_sweep.py '{"preset": "best", "epochs": 30}' --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from digitlab.config import AugmentConfig
from digitlab.data import DigitData, load_mnist
from digitlab.data.split import split
from digitlab.presets import get_preset
from digitlab.train import fit


def variant_config(spec: dict[str, Any], train_count: int, seed: int):
    over = dict(spec)
    preset = over.pop("preset", "fast")
    images = over.pop("images", None)
    if images:
        over["epoch_fraction"] = min(1.0, images / train_count)
    if "augment" in over:
        over["augment"] = AugmentConfig(**over["augment"])
    return get_preset(preset).with_overrides(val_split=0.0, seed=seed, **over)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", type=json.loads, help="JSON objects of overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--val-images", type=int, default=10_000)
    args = parser.parse_args()

    data = load_mnist("train")
    train_idx, val_idx = split(data.labels, args.val_images / len(data), 0)
    train: DigitData = data.subset(train_idx, "mnist:train[sweep-train]")
    val: DigitData = data.subset(val_idx, "mnist:train[sweep-val]")
    print(f"{len(train):,} training / {len(val):,} validation images; seeds {args.seeds}\n")
    print("| variant | val acc per seed | mean | train s per seed |")
    print("|---|---|---:|---|")
    for spec in args.variants:
        accs, secs = [], []
        for seed in args.seeds:
            config = variant_config(spec, len(train), seed)
            with tempfile.TemporaryDirectory() as tmp:
                result = fit(config, os.path.join(tmp, "run"), data=(train, val), progress=False)
            accs.append(result.final["val_acc"])
            secs.append(result.train_seconds)
        print(f"| `{json.dumps(spec)}` | {' '.join(f'{100 * a:.2f}%' for a in accs)} | "
              f"{100 * sum(accs) / len(accs):.2f}% | {' '.join(f'{s:.1f}' for s in secs)} |", flush=True)


if __name__ == "__main__":
    main()
