"""The self-contained HTML report of a run, drawn with the figures of digitlab.figures.

`write_report(run_dir)` evaluates the run and writes report.html (every figure embedded as a
base64 PNG, no external resources) with each figure also saved as a PNG beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from digitlab import figures as draw
from digitlab.data.dataset import DigitData

# The figures live in digitlab.figures; these names stay importable from here.
from digitlab.figures import (  # noqa: F401
    augment_preview_figure,
    confusion_figure,
    figure_png,
    mistakes_figure,
    per_class_error_figure,
    reliability_figure,
    sample_grid_figure,
    save_augment_preview,
    save_figure,
    save_sample_grid,
    smooth,
    training_curves_figure,
)

log = logging.getLogger(__name__)


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
    from digitlab.rundir import ensemble_members, is_ensemble

    return ensemble_members(run_dir) if is_ensemble(run_dir) else [run_dir]


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


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_report(run_dir: str | Path, data: str | DigitData | None = None, out: str | Path | None = None,
                 tta: bool = False, max_mistakes: int = 40, include_seen: bool = False) -> Path:
    """Evaluate `run_dir` (run or ensemble folder) on `data` and write the HTML report; returns its path.

    `data=None`: the run's default evaluation set (digitlab.overlap.default_evaluation); images the
    run trained on are left out of the figures unless `include_seen`.
    """
    from digitlab.data import load_source
    from digitlab.errors import DigitlabError
    from digitlab.evaluate import evaluate_run
    from digitlab.inference import load_predictor
    from digitlab.overlap import default_evaluation

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report" / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise DigitlabError(f"{out}: the report is HTML; give a file name ending in .html")
    choice = "named by the caller"
    if data is None:
        data, choice = default_evaluation(run_dir)
    data = load_source(data) if isinstance(data, str) else data
    predictor = load_predictor(run_dir)
    result = evaluate_run(predictor, data, tta=tta, include_seen=include_seen, run_dir=run_dir, choice=choice)
    for note in result.extra["notes"]:
        log.warning("%s", note)  # the HTML says it too, but the person at the terminal should hear it
    from digitlab.rundir import read_metrics

    members = _run_folders(run_dir)
    metrics = [read_metrics(member) for member in members]  # once each: the page uses them three times
    histories = _training_histories(run_dir, members, metrics)
    figures = _draw_figures(data, result, histories, run_dir, max_mistakes)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key, png in figures.items():
        (out.parent / FIGURE_FILES[key]).write_bytes(png)
    report = _Report(run_dir, members, predictor, result, data, figures, histories, metrics, tta, max_mistakes,
                     include_seen)
    out.write_text(report.page(), encoding="utf-8")
    log.info("wrote %s with %d figures", out, len(figures))
    return out


def _training_histories(run_dir: Path, members: list[Path],
                        metrics: list[list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per-batch/epoch records to plot: the run's own, or the first five members' (more is unreadable)."""
    if len(members) == 1:
        histories = {run_dir.name: metrics[0]}
    else:
        histories = {f"member {i + 1} ({m.name})": metrics[i] for i, m in enumerate(members[:5])}
    return {k: v for k, v in histories.items() if v}


def _draw_figures(data: DigitData, result: Any, histories: dict[str, list[dict[str, Any]]], run_dir: Path,
                  max_mistakes: int) -> dict[str, bytes]:
    figures: dict[str, bytes] = {
        "samples": draw.figure_png(draw.sample_grid_figure(data, n=20, seed=0, cols=10)),
        "confusion": draw.figure_png(draw.confusion_figure(result.confusion)),
        "per-class": draw.figure_png(draw.per_class_error_figure(result)),
        "mistakes": draw.figure_png(draw.mistakes_figure(data.images, result.misclassified, n=max_mistakes)),
    }
    if histories:
        figures["training"] = draw.figure_png(draw.training_curves_figure(histories))
    calibration = _read_json(run_dir / "calibration.json")
    if calibration and "before" in calibration:
        figures["calibration"] = draw.figure_png(draw.reliability_figure(calibration))
    return figures


@dataclass
class _Report:
    """Everything the page shows, and the page itself: facts (cards, tables) then the template."""

    run_dir: Path
    members: list[Path]
    predictor: Any
    result: Any
    data: DigitData
    figures: dict[str, bytes]
    histories: dict[str, list[dict[str, Any]]]
    metrics: list[list[dict[str, Any]]]  # each member's metrics.jsonl records, in `members` order
    tta: bool
    max_mistakes: int
    include_seen: bool

    def __post_init__(self) -> None:
        from digitlab.rundir import CONFIG_FILE

        self.first_meta = self.predictor.meta.get("member_meta", [self.predictor.meta])[0]  # an ensemble: 1st member
        self.config = _read_json(self.members[0] / CONFIG_FILE) or {}
        self.choice = self.result.extra["data_choice"]
        self.title = f"{self.run_dir.name}: {self.first_meta.get('preset', '?')} / {self.first_meta.get('model', '?')}"
        if self.predictor.members > 1:
            self.title += f", ensemble of {self.predictor.members}"

    def figure(self, key: str, alt: str) -> str:
        return _img(self.figures[key], alt, FIGURE_FILES[key]) if key in self.figures else ""

    def cards(self) -> list[tuple[str, str]]:
        result, seen, members = self.result, self.result.extra["seen_in_training"], self.members
        seen_text = "not checked" if seen is None else f"{seen:,} " + ("counted" if self.include_seen else "left out")
        train_seconds = sum(r.get("train_seconds", 0) for records in self.metrics for r in records
                            if r.get("type") == "epoch")
        forecast = result.extra.get("expected_leaderboard")
        return [
            (f"{100 * result.accuracy:.2f}%", f"accuracy on {result.source}"),
            *([(f"{100 * forecast['low95']:.2f}–{100 * forecast['high95']:.2f}%",
                "expected on unseen data like it, e.g. a Kaggle leaderboard (95% interval)")] if forecast else []),
            (f"{result.errors:,}", f"errors of {result.total:,}"),
            (seen_text, "images seen in training"),
            (f"{result.mean_confidence:.4f}", "mean confidence"),
            (f"{result.macro_f1:.4f}", "macro F1"),
            (f"{self.first_meta.get('parameters', 0):,}", "parameters"),
            (_fmt_seconds(train_seconds or None),
             "training time" + (f" ({len(members)} members)" if len(members) > 1 else "")),
        ]

    def run_info(self) -> list[tuple[str, Any]]:
        from digitlab.checkpoint import versions

        result, meta, config = self.result, self.first_meta, self.config
        data_info = config.get("data", meta.get("data", {}))
        epochs = [r for r in self.metrics[0] if r.get("type") == "epoch"]
        speed = [r["images_per_s"] for r in epochs if "images_per_s" in r]
        return [
            ("run folder", self.run_dir.resolve()),
            ("members", ", ".join(m.name for m in self.members)),
            ("evaluated data", f"{result.source} ({result.total:,} of {result.extra['source_count']:,} "
                               "images measured)"),
            ("how it was chosen", self.choice),
            *(("overlap with training data", note) for note in result.extra["notes"]),
            ("evaluated data fingerprint", result.fingerprint),
            ("training data", f"{data_info.get('train_source')} ({data_info.get('train_count', 0):,} images)"),
            ("training data fingerprint", data_info.get("train_fingerprint")),
            ("validation data", f"{data_info.get('val_source')} ({data_info.get('val_count', 0):,} images)"),
            ("validation data fingerprint", data_info.get("val_fingerprint")),
            ("training time (optimisation)", _fmt_seconds(meta.get("train_seconds"))),
            ("training speed", f"{max(speed):,.0f} images/s (best epoch)" if speed else "n/a"),
            ("training device / precision", f"{config.get('resolved', {}).get('device', '?')} / "
                                            f"{meta.get('precision', '?')}"),
            ("started", config.get("started", "?")),
            ("evaluation time", f"{result.seconds:.2f} s ({result.total / max(result.seconds, 1e-9):,.0f} "
                                f"images/s, {self.predictor.precision}{', TTA' if self.tta else ''})"),
            *((f"versions at training: {k}", v) for k, v in meta.get("versions", {}).items()),
            *((f"versions now: {k}", v) for k, v in versions().items()),
            ("report written", datetime.now().isoformat(timespec="seconds")),
        ]

    def body(self) -> str:
        from digitlab.models import summary_text

        result, members, figure = self.result, self.members, self.figure
        train_cfg = self.config.get("config", self.first_meta.get("config", {}))
        per_class_rows = "".join(
            f"<tr><td>{c.digit}</td><td>{c.precision:.4f}</td><td>{c.recall:.4f}</td><td>{c.f1:.4f}</td>"
            f"<td>{c.support:,}</td></tr>" for c in result.per_class
        )
        cards = "".join(f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>'
                        for v, k in self.cards())
        nav = "".join(f'<a href="#{s}">{s}</a>' for s in REPORT_SECTIONS)
        return f"""
<h1>{_esc(self.title)}</h1>
<p class="sub">digitlab run report &middot; {_esc(result.source)} &middot;
{'test-time augmentation &middot; ' if self.tta else ''}{_esc(datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>
<p class="sub">Evaluated data: {_esc(self.choice)}.
{''.join(f"<br><strong>{_esc(n)}</strong>" for n in result.extra["notes"])}</p>
<nav>{nav}</nav>
<section id="summary"><h2>Summary</h2><div class="cards">
{cards}
</div></section>
<section id="samples"><h2>Sample of the evaluated data</h2>
<p>20 images drawn at random (seed 0), in the order of the data, with their labels.</p>
{figure("samples", "sample digits")}</section>
<section id="training"><h2>Training curves</h2>
{figure("training", "training curves") or "<p>No metrics.jsonl found: no training curves.</p>"}
{f"<p>Showing {len(self.histories)} of {len(members)} members.</p>" if len(members) > 1 else ""}</section>
<section id="confusion"><h2>Confusion matrix</h2>{figure("confusion", "confusion matrix")}</section>
<section id="per-class"><h2>Per-class results</h2>{figure("per-class", "per-class error rates")}
<table><tr><th>digit</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class_rows}</table>
</section>
<section id="mistakes"><h2>Misclassified digits</h2>
<p>{min(self.max_mistakes, result.errors)} of {result.errors} mistakes, most confident first; under each, the
three most likely digits with their probabilities ({FIGURE_FILES["mistakes"]} beside this page shows the
same as one picture).</p>{mistakes_html(self.data.images, result.misclassified, self.max_mistakes)}</section>
{calibration_section(self.run_dir, self.figures.get("calibration"))}
<section id="model"><h2>Model</h2><pre>{_esc(summary_text(self.predictor.models[0], self.title))}</pre></section>
<section id="config"><h2>Training configuration</h2><pre>{_esc(json.dumps(train_cfg, indent=2))}</pre></section>
<section id="run-info"><h2>Data, versions and timings</h2>{_kv_table(self.run_info())}</section>
"""

    def page(self) -> str:
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(self.title)}</title><style>{_CSS}</style></head>
<body>{self.body()}</body></html>
"""
