"""The figures of a run as matplotlib Figures: samples, training curves, confusion, errors, mistakes.

The HTML report, TensorBoard and notebooks all draw with these. They build `Figure` objects
directly (no pyplot), so nothing is shown or kept open behind the caller's back and any
backend works: a notebook displays the returned figure inline, the report saves it as a PNG.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from digitlab.config import AugmentConfig
from digitlab.data.dataset import DigitData
from digitlab.errors import DigitlabError

log = logging.getLogger(__name__)

Records = list[dict[str, Any]]  # metrics.jsonl: batch and epoch records (digitlab.rundir.read_metrics)


def _grid(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def sample_grid_figure(data: DigitData, n: int = 10, seed: int | None = None, cols: int = 5) -> Figure:
    """The seed notebook's first figure: N digits in a grid, each titled with its label."""
    n = min(n, len(data))
    if seed is None:
        index = np.arange(n)
    else:
        index = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = _grid(rows, cols, (1.6 * cols, 1.8 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, index, strict=False):
        ax.imshow(data.images[i], cmap="gray", vmin=0, vmax=255)
        title = f"#{i}" if data.labels is None else f"{data.labels[i]}  (#{i})"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def augment_preview_figure(data: DigitData, config: AugmentConfig, n: int = 8, copies: int = 5,
                           seed: int = 0) -> Figure:
    """Each row: an original digit, then `copies` augmented versions of it."""
    import torch  # only this figure needs torch: the others stay importable without it

    from digitlab.augment import augment_batch

    n = min(n, len(data))
    originals = torch.from_numpy(data.images[:n]).float().div(255).unsqueeze(1)  # (n, 1, 28, 28)
    generator = torch.Generator(device="cpu").manual_seed(seed)  # the preview is drawn on CPU images
    batch = originals.repeat_interleave(copies, dim=0)
    augmented = augment_batch(batch, config, generator).view(n, copies, 28, 28)
    fig, axes = _grid(n, copies + 1, (1.2 * (copies + 1), 1.25 * n))
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


# ---------------------------------------------------------------- training curves


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): no lag at the start."""
    out = np.empty(len(values), dtype=np.float64)
    avg = 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def batch_curve(records: Records) -> tuple[np.ndarray, np.ndarray]:
    """x in epochs (epoch - 1 + step / steps of that epoch), loss per batch."""
    batches = [r for r in records if r.get("type") == "batch"]
    steps: dict[int, int] = {}
    for r in batches:
        steps[r["epoch"]] = max(steps.get(r["epoch"], 0), r["step"])
    x = np.array([r["epoch"] - 1 + r["step"] / steps[r["epoch"]] for r in batches])
    return x, np.array([r["loss"] for r in batches], dtype=np.float64)


def _histories(records: Records | dict[str, Records]) -> dict[str, Records]:
    return records if isinstance(records, dict) else {"run": records}


def _colours() -> list[str]:
    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def draw_batch_loss(ax: Axes, records: Records | dict[str, Records]) -> None:
    """Per-batch training loss: raw (one run only) and smoothed, on a log scale."""
    histories = _histories(records)
    single = len(histories) == 1
    for i, (name, recs) in enumerate(histories.items()):
        x, loss = batch_curve(recs)
        if not len(x):
            continue
        if single:
            ax.plot(x, loss, color="0.75", lw=0.6, label="per batch")
        label = "" if single else f"{name} "
        ax.plot(x, smooth(loss), color=_colours()[i % len(_colours())], lw=1.5, label=f"{label}smoothed (EMA 0.9)")
    ax.set(title="training loss per batch", xlabel="epoch", ylabel="cross-entropy")
    ax.set_yscale("log")
    _finish_axes(ax)


def draw_epoch_curves(ax_loss: Axes, ax_acc: Axes, records: Records | dict[str, Records]) -> None:
    """Per-epoch loss and accuracy, training dashed and validation solid."""
    histories = _histories(records)
    single = len(histories) == 1
    for i, (name, recs) in enumerate(histories.items()):
        colour = _colours()[i % len(_colours())]
        label = "" if single else f"{name} "
        epochs = [r for r in recs if r.get("type") == "epoch"]
        if not epochs:
            log.info("%s: no epoch records", name)
        for key, style, what in (("train", "--", "train"), ("val", "-", "validation")):
            # one run: train and validation in two colours; several: a colour per run, a style per split
            line_colour = (_colours()[0] if key == "train" else _colours()[1]) if single else colour
            for ax, metric in ((ax_loss, f"{key}_loss"), (ax_acc, f"{key}_acc")):
                points = [(r["epoch"], r[metric]) for r in epochs if metric in r]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o" if key == "val" else "s", ms=4,
                            color=line_colour, label=f"{label}{what}")
    ax_loss.set(title="loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        _finish_axes(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish_axes(ax: Axes) -> None:
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)


def batch_loss_figure(records: Records | dict[str, Records]) -> Figure:
    """Per-batch loss (raw + smoothed) of one run's records, or smoothed curves of {name: records}."""
    fig = Figure(figsize=(7, 4))
    draw_batch_loss(fig.subplots(), records)
    fig.tight_layout()
    return fig


def epoch_curves_figure(records: Records | dict[str, Records]) -> Figure:
    """Loss and accuracy per epoch, training and validation."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    draw_epoch_curves(ax_loss, ax_acc, records)
    fig.tight_layout()
    return fig


def training_curves_figure(histories: Records | dict[str, Records]) -> Figure:
    """The report's three panels: per-batch loss, per-epoch loss and accuracy; one run or a few members."""
    fig = Figure(figsize=(13, 4))
    ax_batch, ax_loss, ax_acc = fig.subplots(1, 3)
    draw_batch_loss(ax_batch, histories)
    draw_epoch_curves(ax_loss, ax_acc, histories)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- evaluation


def confusion_figure(confusion: np.ndarray) -> Figure:
    """Heat map of counts (log colour scale so the few mistakes show beside the large diagonal)."""
    n = len(confusion)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    shown = np.ma.masked_equal(confusion, 0)
    im = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(2, int(confusion.max()))))
    threshold = np.sqrt(max(2, int(confusion.max())))  # the middle of the log scale
    for t in range(n):
        for p in range(n):
            count = int(confusion[t, p])
            if count:
                ax.text(p, t, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > threshold else "black",
                        fontweight="bold" if t != p else "normal")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set(xlabel="predicted digit", ylabel="true digit", title="confusion matrix (counts)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images (log scale)")
    fig.tight_layout()
    return fig


def per_class_error_figure(result) -> Figure:
    """Per digit: the share of its images missed (1 - recall) and of its predictions wrong (1 - precision).

    `result` is a digitlab.evaluate.EvalResult.
    """
    digits = np.arange(len(result.per_class))
    missed = np.array([100 * (1 - c.recall) for c in result.per_class])
    false = np.array([100 * (1 - c.precision) for c in result.per_class])
    missed_n = result.confusion.sum(axis=1) - np.diag(result.confusion)
    false_n = result.confusion.sum(axis=0) - np.diag(result.confusion)
    fig = Figure(figsize=(9, 4.6))
    ax = fig.subplots()
    ax.bar(digits - 0.2, missed, width=0.4, label="missed: true digit predicted as another (1 - recall)")
    ax.bar(digits + 0.2, false, width=0.4, label="wrong: predicted digit was another (1 - precision)")
    for d in digits:  # both series carry their image counts
        ax.text(d - 0.2, missed[d], f"{missed_n[d]}", ha="center", va="bottom", fontsize=8)
        ax.text(d + 0.2, false[d], f"{false_n[d]}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(digits)
    ax.set(xlabel="digit", ylabel="error rate (%)", title="errors per class (numbers: images)")
    ax.margins(y=0.12)  # room for the counts above the tallest bar
    # below the axes, where it can cover no bar
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def mistakes_figure(images: np.ndarray, mistakes: list, n: int = 40, cols: int = 8) -> Figure:
    """The most confident mistakes: each tile 'true 4 -> predicted 9 (p=0.87)' and its top-3.

    `images` are the evaluated images (N, 28, 28); `mistakes` is EvalResult.misclassified.
    """
    shown = mistakes[:n]
    if not shown:
        fig = Figure(figsize=(6, 1))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return fig
    cols = min(cols, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = _grid(rows, cols, (1.9 * cols, 2.5 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, shown, strict=False):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(images[m.index], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {m.true} -> predicted {m.predicted}\n(p={m.probability:.2f})", fontsize=9)
        # an axis label, not free text, so tight_layout keeps it clear of the next row's titles
        ax.set_xlabel("  ".join(f"{d}:{p:.2f}" for d, p in m.top3) + f"\nimage #{m.index}", fontsize=8,
                      color="0.25")
    fig.tight_layout(h_pad=0.6)
    return fig


# ---------------------------------------------------------------- writing


def reliability_figure(calibration: dict[str, Any]) -> Figure:
    """Reliability diagram before/after temperature scaling, from a run's calibration.json."""
    fig = Figure(figsize=(10, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, what in ((axes[0], "before", "before"), (axes[1], "after", "after temperature scaling")):
        r = calibration[key]
        edges, count = np.array(r["edges"]), np.array(r["count"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        used = count > 0
        ax.bar(centres[used], np.array(r["accuracy"])[used], width=width[used], edgecolor="k", lw=0.5,
               color="#4c78a8", label="accuracy in bin")
        ax.plot([0, 1], [0, 1], "--", color="0.4", lw=1, label="perfect calibration")
        ax.plot(np.array(r["confidence"])[used], np.array(r["accuracy"])[used], "o", color="#e45756", ms=4,
                label="mean confidence in bin")
        ax.set(title=f"{what}: ECE {100 * r['ece']:.2f}%", xlabel="confidence (top probability)",
               xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"reliability on {calibration.get('source', '?')} ({calibration.get('count', 0):,} images), "
                 f"temperature {calibration['temperature']:.3f}", fontsize=10)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_rgb(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (TensorBoard images)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


IMAGE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path`; its suffix picks the format (no suffix: PNG, and `.png` is added)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")  # what matplotlib would write, named so the caller reports it
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DigitlabError(f"{path}: unknown image format {path.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def save_sample_grid(data: DigitData, path: str | Path, n: int = 10, seed: int | None = None) -> Path:
    return save_figure(sample_grid_figure(data, n=n, seed=seed), path)


def save_augment_preview(data: DigitData, config: AugmentConfig, path: str | Path, n: int = 8,
                         copies: int = 5, seed: int = 0) -> Path:
    return save_figure(augment_preview_figure(data, config, n=n, copies=copies, seed=seed), path)
