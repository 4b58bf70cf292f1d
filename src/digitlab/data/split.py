"""Stratified, seeded train/validation split, identical across runs and machines.

Uses numpy's PCG64 generator (bit-stable across platforms) per class, so the same
labels, fraction and seed always give the same indices.
"""

from __future__ import annotations

import numpy as np

from digitlab.errors import DigitlabError


def split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_index, val_index); each class keeps its share in both parts."""
    if not 0.0 <= val_fraction < 1.0:
        raise DigitlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    if val_fraction == 0.0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = round(len(members) * val_fraction)
        val_parts.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val
