"""Terminal rendering of training events: a live bar on a terminal, one line per epoch otherwise.

Library code only emits events; this is the CLI's view of them.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainingProgress:
    """Callable training-event sink. `live=None` picks a bar when the stream is a terminal."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.live = (self.stream.isatty() if live is None else live) and not quiet
        self.quiet = quiet
        self._epoch_start = 0.0
        self._last_draw = 0.0
        self._loss = 0.0
        self._acc = 0.0
        self._n = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self._write(start_line(event) + "\n")
        elif kind == "epoch_start":
            self._epoch_start = time.perf_counter()
            self._loss = self._acc = 0.0
            self._n = 0
        elif kind == "batch" and self.live:
            self._n += 1
            # exponential smoothing so the bar's numbers do not flicker
            w = 0.1 if self._n > 1 else 1.0
            self._loss += w * (event["loss"] - self._loss)
            self._acc += w * (event["acc"] - self._acc)
            now = time.perf_counter()
            if now - self._last_draw < 0.1 and event["step"] < event["steps"]:
                return
            self._last_draw = now
            done, total = event["step"], event["steps"]
            width = 24
            filled = int(width * done / total)
            elapsed = now - self._epoch_start
            eta = elapsed / max(1, self._n) * (total - done)
            self._write(
                f"\repoch {event['epoch']} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"loss {self._loss:.4f} acc {self._acc:.4f} {event['images_per_s']:,.0f} img/s "
                f"ETA {format_duration(eta)}  "
            )
        elif kind == "epoch":
            if self.live:
                self._write("\r\033[K")
            if self.quiet and event["epoch"] != event["epochs"]:
                return
            self._write(epoch_line(event) + "\n")
        elif kind == "interrupted":
            if self.live:
                self._write("\n")
        elif kind == "end" and not self.quiet:
            self._write(f"done in {format_duration(event['train_seconds'])} of training; "
                        f"model saved to {event['run_dir']}\n")


def epoch_line(rec: dict[str, Any]) -> str:
    line = (
        f"epoch {rec['epoch']:>3}/{rec['epochs']}  loss {rec['train_loss']:.4f}  acc {rec['train_acc']:.4f}"
    )
    if "val_acc" in rec:
        line += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_acc']:.4f}"
    line += f"  lr {rec['lr']:.2e}  {rec['images_per_s']:,.0f} img/s  {rec['train_seconds']:.1f}s"
    return line


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def start_line(event: dict[str, Any]) -> str:
    """The first line of a run: what trains where; for a resumed run, where it picks up."""
    cfg = event["config"]
    where = f"{event['device']} {event['precision']}{', CUDA graphs' if event.get('cuda_graphs') else ''}"
    if event.get("resumed"):
        if event["start_epoch"] > cfg.epochs:
            return f"{event['run_dir']}: already finished ({plural(cfg.epochs, 'epoch')}); nothing to resume"
        return (f"resuming {cfg.preset} in {event['run_dir']} at epoch {event['start_epoch']}, step "
                f"{event['start_step']} of {plural(cfg.epochs, 'epoch')}; {where}")
    fraction = cfg.epoch_fraction
    # `fast` trains on a random share of the images each epoch: say so, not only the set's size
    share = f" (a random {fraction:.0%} of them each epoch)" if fraction < 1 else ""
    return (f"training {cfg.preset} ({cfg.model}) on {plural(event['train_count'], 'image')}{share}, validating on "
            f"{event['val_count']:,}; {where}, batch {cfg.batch_size}, {plural(cfg.epochs, 'epoch')} "
            f"-> {event['run_dir']}")


class ProgressBar:
    """Training events as tqdm bars, one per epoch: a widget in Jupyter, a text bar in a terminal.

    What `fit(..., progress=True)` shows; the bar's loss and accuracy are smoothed like the CLI's,
    and each finished bar keeps its epoch's summary (validation included).
    """

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file
        self._bar: Any = None
        self._loss = self._acc = 0.0
        self._n = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "epoch_start":
            with warnings.catch_warnings():
                # without ipywidgets, Jupyter gets tqdm's text bar, which is fine: no warning about it
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm

            self.close()
            self._loss = self._acc = 0.0
            self._n = 0
            self._bar = tqdm(total=event["steps"], initial=event["step"], desc=f"epoch {event['epoch']}/"
                             f"{event['epochs']}", unit="batch", file=self.file, dynamic_ncols=True)
        elif self._bar is None:
            return
        elif kind == "batch":
            self._n += 1
            w = 0.1 if self._n > 1 else 1.0
            self._loss += w * (event["loss"] - self._loss)
            self._acc += w * (event["acc"] - self._acc)
            # refresh=False: the bar redraws at most every 0.1 s, not on every batch
            self._bar.set_postfix_str(f"loss {self._loss:.4f} acc {self._acc:.4f}", refresh=False)
            self._bar.update(event["step"] - self._bar.n)
        elif kind == "epoch":
            summary = f"loss {event['train_loss']:.4f} acc {event['train_acc']:.4f}"
            if "val_acc" in event:
                summary += f" val_loss {event['val_loss']:.4f} val_acc {event['val_acc']:.4f}"
            self._bar.set_postfix_str(summary, refresh=False)
            self.close()
        elif kind in ("interrupted", "end"):
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
