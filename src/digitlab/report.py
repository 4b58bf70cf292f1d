"""Figures (matplotlib, Agg backend) and the self-contained HTML report of a run.

`write_report(run_dir)` evaluates the run and writes report.html (every figure embedded as a
base64 PNG, no external resources) with each figure also saved as a PNG beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here or on CI; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm
from PIL import Image

from digitlab.augment import AugmentConfig, augment_batch
from digitlab.data.dataset import DigitData

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- the run report's figures


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing): no lag at the start."""
    out = np.empty(len(values), dtype=np.float64)
    avg = 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def _batch_curve(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """x in epochs (epoch - 1 + step / steps of that epoch), loss per batch."""
    batches = [r for r in records if r.get("type") == "batch"]
    steps: dict[int, int] = {}
    for r in batches:
        steps[r["epoch"]] = max(steps.get(r["epoch"], 0), r["step"])
    x = np.array([r["epoch"] - 1 + r["step"] / steps[r["epoch"]] for r in batches])
    return x, np.array([r["loss"] for r in batches], dtype=np.float64)


def training_curves_figure(histories: dict[str, list[dict[str, Any]]]):
    """Per-batch loss (raw + smoothed), per-epoch loss and accuracy; one run or up to a few members."""
    fig, (ax_batch, ax_loss, ax_acc) = plt.subplots(1, 3, figsize=(13, 4))
    single = len(histories) == 1
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(histories.items()):
        colour = colours[i % len(colours)]
        label = "" if single else f"{name} "
        x, loss = _batch_curve(records)
        if len(x):
            if single:
                ax_batch.plot(x, loss, color="0.75", lw=0.6, label="per batch")
            ax_batch.plot(x, smooth(loss), color=colour, lw=1.5, label=f"{label}smoothed (EMA 0.9)")
        epochs = [r for r in records if r.get("type") == "epoch"]
        e = [r["epoch"] for r in epochs]
        for key, style, what in (("train", "--", "train"), ("val", "-", "validation")):
            # one run: train and validation in two colours; several: a colour per member, style per split
            line_colour = (colours[0] if key == "train" else colours[1]) if single else colour
            for ax, metric in ((ax_loss, f"{key}_loss"), (ax_acc, f"{key}_acc")):
                points = [(r["epoch"], r[metric]) for r in epochs if metric in r]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o" if key == "val" else "s", ms=4,
                            color=line_colour, label=f"{label}{what}")
        if not e:
            log.info("%s: no epoch records", name)
    ax_batch.set(title="training loss per batch", xlabel="epoch", ylabel="cross-entropy")
    ax_loss.set(title="loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    ax_batch.set_yscale("log")
    for ax in (ax_batch, ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: np.ndarray):
    """Heat map of counts (log colour scale so the few mistakes show beside the large diagonal)."""
    n = len(confusion)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
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


def per_class_error_figure(result):
    """Per digit: the share of its images missed (1 - recall) and of its predictions wrong (1 - precision)."""
    digits = np.arange(len(result.per_class))
    missed = np.array([100 * (1 - c.recall) for c in result.per_class])
    false = np.array([100 * (1 - c.precision) for c in result.per_class])
    missed_n = result.confusion.sum(axis=1) - np.diag(result.confusion)
    false_n = result.confusion.sum(axis=0) - np.diag(result.confusion)
    fig, ax = plt.subplots(figsize=(9, 4.6))
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


def mistakes_figure(images: np.ndarray, mistakes: list, n: int = 40, cols: int = 8):
    """The most confident mistakes: each tile 'true 4 -> predicted 9 (p=0.87)' and its top-3."""
    shown = mistakes[:n]
    if not shown:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return fig
    cols = min(cols, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.5 * rows), squeeze=False)
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


def reliability_figure(calibration: dict[str, Any]):
    """Reliability diagram before/after temperature scaling, from a run's calibration.json."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
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


def calibration_section(run_dir: Path, png: bytes | None) -> str:
    """The report's calibration section: the reliability diagram, or how to get one."""
    calibration = _read_json(Path(run_dir) / "calibration.json")
    if not calibration or png is None:
        return ('<section id="calibration"><h2>Calibration</h2><p>Not calibrated: run '
                f"<code>digitlab calibrate {_esc(run_dir)}</code>.</p></section>")
    before, after = calibration["before"]["ece"], calibration["after"]["ece"]
    return (f'<section id="calibration"><h2>Calibration</h2><p>Temperature '
            f"{calibration['temperature']:.3f}, fitted on {_esc(calibration.get('source'))} (never the test set): "
            f"expected calibration error {100 * before:.2f}% before, {100 * after:.2f}% after; negative "
            f"log-likelihood {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}. Predictions "
            f"apply the temperature.</p>{_img(png, 'reliability diagram', FIGURE_FILES['calibration'])}</section>")


def mistakes_html(images: np.ndarray, mistakes: list, n: int = 40) -> str:
    """The most confident mistakes as HTML tiles: captions are text, readable at any screen width."""
    if not mistakes:
        return "<p>No misclassified images.</p>"
    tiles = []
    for m in mistakes[:n]:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(images[m.index], dtype=np.uint8)).save(buf, format="PNG")
        src = base64.b64encode(buf.getvalue()).decode("ascii")
        top3 = " ".join(f"{d}:{p:.2f}" for d, p in m.top3)
        tiles.append(f'<figure><img src="data:image/png;base64,{src}" alt="image #{m.index}">'
                     f"<figcaption>true {m.true} &rarr; {m.predicted} (p={m.probability:.2f})<br>"
                     f'<span class="top3">{_esc(top3)}</span><br>#{m.index}</figcaption></figure>')
    return f'<div class="mistakes">{"".join(tiles)}</div>'


def figure_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- the HTML report

REPORT_SECTIONS = ("summary", "samples", "training", "confusion", "per-class", "mistakes", "calibration",
                   "model", "config", "run-info")
FIGURE_FILES = {
    "samples": "samples.png",
    "training": "training_curves.png",
    "confusion": "confusion_matrix.png",
    "per-class": "per_class_errors.png",
    "mistakes": "mistakes.png",
    "calibration": "reliability.png",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5em; color: #1d2330; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #d8dce4; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #5a6272; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { background: #f3f5f9; border-radius: 8px; padding: 0.7em 1.1em; min-width: 9em; }
.card .v { font-size: 1.5em; font-weight: 600; } .card .k { color: #5a6272; font-size: 0.85em; }
img { max-width: 100%; height: auto; border: 1px solid #e4e7ee; border-radius: 4px; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.82em; border-radius: 6px; }
table { border-collapse: collapse; font-size: 0.9em; display: block; max-width: 100%; overflow-x: auto; }
table.kv td { overflow-wrap: anywhere; }
@media (max-width: 600px) { body { padding: 0.8em; } td, th { padding: 0.25em 0.5em; } }
.mistakes { display: grid; grid-template-columns: repeat(auto-fill, minmax(7.5em, 1fr)); gap: 0.6em; }
.mistakes figure { margin: 0; text-align: center; }
.mistakes img { width: 84px; height: 84px; image-rendering: pixelated; border: 0; }
.mistakes figcaption { font-size: 0.8em; line-height: 1.3; font-variant-numeric: tabular-nums; }
.mistakes .top3 { color: #5a6272; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #e4e7ee; text-align: right; }
th { background: #f3f5f9; } td:first-child, th:first-child { text-align: left; }
nav { display: flex; flex-wrap: wrap; gap: 0.2em 0.9em; }  /* the links sit with no space between them */
table.kv td { text-align: left; font-family: ui-monospace, monospace; }
table.kv td:first-child { font-family: inherit; color: #5a6272; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _img(png: bytes, alt: str, file: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}" title="{_esc(file)}">'


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_folders(run_dir: Path) -> list[Path]:
    from digitlab.inference import ensemble_members, is_ensemble

    return ensemble_members(run_dir) if is_ensemble(run_dir) else [run_dir]


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_report(run_dir: str | Path, data: str | DigitData = "mnist:test", out: str | Path | None = None,
                 tta: bool = False, max_mistakes: int = 40) -> Path:
    """Evaluate `run_dir` (run or ensemble folder) on `data` and write the HTML report; returns its path."""
    from digitlab.checkpoint import versions
    from digitlab.data import load_source
    from digitlab.errors import DigitlabError
    from digitlab.evaluate import evaluate_run
    from digitlab.inference import load_predictor
    from digitlab.models import summary_text
    from digitlab.train import CONFIG_FILE, read_metrics

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report" / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise DigitlabError(f"{out}: the report is HTML; give a file name ending in .html")
    data = load_source(data) if isinstance(data, str) else data
    predictor = load_predictor(run_dir)
    result = evaluate_run(predictor, data, tta=tta)
    members = _run_folders(run_dir)
    first_meta = predictor.meta.get("member_meta", [predictor.meta])[0]  # an ensemble: its first member
    shown_members = members[:5]  # more curves than that are unreadable on one axis
    if len(members) == 1:
        histories = {run_dir.name: read_metrics(run_dir)}
    else:
        histories = {f"member {i + 1} ({m.name})": read_metrics(m) for i, m in enumerate(shown_members)}
    histories = {k: v for k, v in histories.items() if v}

    figures: dict[str, bytes] = {
        "samples": figure_png(sample_grid_figure(data, n=20, seed=0, cols=10)),
        "confusion": figure_png(confusion_figure(result.confusion)),
        "per-class": figure_png(per_class_error_figure(result)),
        "mistakes": figure_png(mistakes_figure(data.images, result.misclassified, n=max_mistakes)),
    }
    if histories:
        figures["training"] = figure_png(training_curves_figure(histories))
    calibration = _read_json(run_dir / "calibration.json")
    if calibration and "before" in calibration:
        figures["calibration"] = figure_png(reliability_figure(calibration))
    out.parent.mkdir(parents=True, exist_ok=True)
    for key, png in figures.items():
        (out.parent / FIGURE_FILES[key]).write_bytes(png)

    def figure(key: str, alt: str) -> str:
        return _img(figures[key], alt, FIGURE_FILES[key]) if key in figures else ""

    # ---- facts about the run
    config = _read_json(members[0] / CONFIG_FILE) or {}
    train_cfg = config.get("config", first_meta.get("config", {}))
    data_info = config.get("data", first_meta.get("data", {}))
    epoch_records = [r for r in read_metrics(members[0]) if r.get("type") == "epoch"]
    speed = [r["images_per_s"] for r in epoch_records if "images_per_s" in r]
    title = f"{run_dir.name}: {first_meta.get('preset', '?')} / {first_meta.get('model', '?')}"
    if predictor.members > 1:
        title += f", ensemble of {predictor.members}"

    cards = [
        (f"{100 * result.accuracy:.2f}%", f"accuracy on {result.source}"),
        (f"{result.errors:,}", f"errors of {result.total:,}"),
        (f"{result.mean_confidence:.4f}", "mean confidence"),
        (f"{result.macro_f1:.4f}", "macro F1"),
        (f"{first_meta.get('parameters', 0):,}", "parameters"),
        (_fmt_seconds(sum(r.get("train_seconds", 0) for m in members for r in read_metrics(m)
                          if r.get("type") == "epoch") or None),
         "training time" + (f" ({len(members)} members)" if len(members) > 1 else "")),
    ]
    per_class_rows = "".join(
        f"<tr><td>{c.digit}</td><td>{c.precision:.4f}</td><td>{c.recall:.4f}</td><td>{c.f1:.4f}</td>"
        f"<td>{c.support:,}</td></tr>" for c in result.per_class
    )
    run_info = [
        ("run folder", run_dir.resolve()),
        ("members", ", ".join(m.name for m in members)),
        ("evaluated data", f"{result.source} ({result.total:,} images)"),
        ("evaluated data fingerprint", result.fingerprint),
        ("training data", f"{data_info.get('train_source')} ({data_info.get('train_count', 0):,} images)"),
        ("training data fingerprint", data_info.get("train_fingerprint")),
        ("validation data", f"{data_info.get('val_source')} ({data_info.get('val_count', 0):,} images)"),
        ("validation data fingerprint", data_info.get("val_fingerprint")),
        ("training time (optimisation)", _fmt_seconds(first_meta.get("train_seconds"))),
        ("training speed", f"{max(speed):,.0f} images/s (best epoch)" if speed else "n/a"),
        ("training device / precision", f"{config.get('resolved', {}).get('device', '?')} / "
                                        f"{first_meta.get('precision', '?')}"),
        ("started", config.get("started", "?")),
        ("evaluation time", f"{result.seconds:.2f} s ({result.total / max(result.seconds, 1e-9):,.0f} "
                            f"images/s, {predictor.precision}{', TTA' if tta else ''})"),
        *((f"versions at training: {k}", v) for k, v in first_meta.get("versions", {}).items()),
        *((f"versions now: {k}", v) for k, v in versions().items()),
        ("report written", datetime.now().isoformat(timespec="seconds")),
    ]
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in REPORT_SECTIONS)
    body = f"""
<h1>{_esc(title)}</h1>
<p class="sub">digitlab run report &middot; {_esc(result.source)} &middot;
{'test-time augmentation &middot; ' if tta else ''}{_esc(datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>
<nav>{nav}</nav>
<section id="summary"><h2>Summary</h2><div class="cards">
{''.join(f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>' for v, k in cards)}
</div></section>
<section id="samples"><h2>Sample of the evaluated data</h2>
<p>The first 20 images chosen with seed 0, with their labels.</p>{figure("samples", "sample digits")}</section>
<section id="training"><h2>Training curves</h2>
{figure("training", "training curves") or "<p>No metrics.jsonl found: no training curves.</p>"}
{f"<p>Showing {len(histories)} of {len(members)} members.</p>" if len(members) > 1 else ""}</section>
<section id="confusion"><h2>Confusion matrix</h2>{figure("confusion", "confusion matrix")}</section>
<section id="per-class"><h2>Per-class results</h2>{figure("per-class", "per-class error rates")}
<table><tr><th>digit</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class_rows}</table>
</section>
<section id="mistakes"><h2>Misclassified digits</h2>
<p>{min(max_mistakes, result.errors)} of {result.errors} mistakes, most confident first; under each, the
three most likely digits with their probabilities ({FIGURE_FILES["mistakes"]} beside this page shows the
same as one picture).</p>{mistakes_html(data.images, result.misclassified, max_mistakes)}</section>
{calibration_section(run_dir, figures.get("calibration"))}
<section id="model"><h2>Model</h2><pre>{_esc(summary_text(predictor.models[0], title))}</pre></section>
<section id="config"><h2>Training configuration</h2><pre>{_esc(json.dumps(train_cfg, indent=2))}</pre></section>
<section id="run-info"><h2>Data, versions and timings</h2>{_kv_table(run_info)}</section>
"""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>{body}</body></html>
"""
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s with %d figures", out, len(figures))
    return out
