"""Figures (matplotlib, Agg backend) and the self-contained HTML report of a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here or on CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import torch  # noqa: E402

from digitlab.augment import AugmentConfig, augment_batch  # noqa: E402
from digitlab.data.dataset import DigitData  # noqa: E402


def sample_grid_figure(data: DigitData, n: int = 10, seed: int | None = None, cols: int = 5):
    """The seed notebook's first figure: N digits in a grid, each titled with its label."""
    n = min(n, len(data))
    if seed is None:
        index = np.arange(n)
    else:
        index = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, index, strict=False):
        ax.imshow(data.images[i], cmap="gray", vmin=0, vmax=255)
        title = f"#{i}" if data.labels is None else f"{data.labels[i]}  (#{i})"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_sample_grid(data: DigitData, path: str | Path, n: int = 10, seed: int | None = None) -> Path:
    return save_figure(sample_grid_figure(data, n=n, seed=seed), path)


def augment_preview_figure(data: DigitData, config: AugmentConfig, n: int = 8, copies: int = 5, seed: int = 0):
    """Each row: an original digit, then `copies` augmented versions of it."""
    n = min(n, len(data))
    originals = torch.from_numpy(data.images[:n]).float().div(255).unsqueeze(1)  # (n, 1, 28, 28)
    generator = torch.Generator().manual_seed(seed)
    batch = originals.repeat_interleave(copies, dim=0)
    augmented = augment_batch(batch, config, generator).view(n, copies, 28, 28)
    fig, axes = plt.subplots(n, copies + 1, figsize=(1.2 * (copies + 1), 1.25 * n), squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(originals[row, 0], cmap="gray", vmin=0, vmax=1)
        for col in range(copies):
            axes[row, col + 1].imshow(augmented[row, col], cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("original", fontsize=8)
    for col in range(copies):
        axes[0, col + 1].set_title(f"aug {col + 1}", fontsize=8)
    fig.tight_layout()
    return fig


def save_augment_preview(data: DigitData, config: AugmentConfig, path: str | Path, n: int = 8,
                         copies: int = 5, seed: int = 0) -> Path:
    return save_figure(augment_preview_figure(data, config, n=n, copies=copies, seed=seed), path)
