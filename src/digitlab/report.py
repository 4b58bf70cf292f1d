"""Figures (matplotlib, Agg backend) and the self-contained HTML report of a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here or on CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
