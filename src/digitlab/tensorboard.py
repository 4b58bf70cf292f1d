"""TensorBoard event files for a training run, written by a fit() callback into the run folder.

`digitlab train --tensorboard` (TrainConfig.tensorboard) attaches it; `tensorboard --logdir runs`
then shows every run. All scalars share one x axis, the optimizer step, so a resumed run lines up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from digitlab.data.dataset import DigitData
from digitlab.errors import DigitlabError

log = logging.getLogger(__name__)

EPOCH_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")


def require_tensorboard() -> type:
    """torch's SummaryWriter, or one clear error when the optional `tensorboard` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DigitlabError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'digitlab[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


class TensorBoardLogger:
    """fit() callback: per-batch loss and learning rate, per-epoch metrics, and at the end the most
    confident mistakes on `val_data` (and its confusion matrix) as images.

    Resuming opens a new event file in the same folder whose `purge_step` hides whatever an earlier
    session logged after the checkpoint it resumes from, so no step is shown twice.
    """

    def __init__(self, log_dir: str | Path, val_data: DigitData | None = None, max_mistakes: int = 40) -> None:
        self._writer_class = require_tensorboard()  # fail before training, not after
        self.log_dir = Path(log_dir)
        self.val_data = val_data
        self.max_mistakes = max_mistakes
        self.writer: Any = None
        self.steps_per_epoch = 1

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps done after `step` of `epoch` (1-based epochs)."""
        return (epoch - 1) * self.steps_per_epoch + step

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self._open(event)
        elif self.writer is None:
            return
        elif kind == "batch":
            step = self.global_step(event["epoch"], event["step"])
            self.writer.add_scalar("batch/loss", event["loss"], step)
            self.writer.add_scalar("batch/lr", event["lr"], step)
        elif kind == "epoch":
            step = self.global_step(event["epoch"], self.steps_per_epoch)
            for key in EPOCH_SCALARS:
                if key in event:
                    self.writer.add_scalar(f"epoch/{key}", event[key], step)
            self.writer.flush()  # on disk with the epoch's checkpoint
        elif kind == "interrupted":
            self.close()
        elif kind == "end":
            self._log_mistakes(event["run_dir"], self.global_step(event["final"]["epoch"], self.steps_per_epoch))
            self.close()

    def _open(self, event: dict[str, Any]) -> None:
        config = event["config"]
        if event.get("start_epoch", 1) > config.epochs:
            return  # a finished run "resumed": nothing new to log, and the end images exist already
        self.steps_per_epoch = event["steps_per_epoch"]
        purge = None
        if event.get("resumed"):
            purge = self.global_step(event["start_epoch"], event.get("start_step", 0)) + 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge)
        if purge is None:
            self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```", 0)
        log.info("TensorBoard events in %s (purge_step %s)", self.log_dir, purge)

    def _log_mistakes(self, run_dir: str, step: int) -> None:
        if self.val_data is None or not len(self.val_data):
            self.writer.add_text("validation", "no validation set: no mistakes grid", step)
            return
        from digitlab import figures
        from digitlab.evaluate import evaluate_run

        result = evaluate_run(run_dir, self.val_data)  # the saved model, as a user will load it
        grid = figures.mistakes_figure(self.val_data.images, result.misclassified, n=self.max_mistakes)
        self.writer.add_image("validation/mistakes", figures.figure_rgb(grid, dpi=80), step, dataformats="HWC")
        confusion = figures.confusion_figure(result.confusion)
        self.writer.add_image("validation/confusion_matrix", figures.figure_rgb(confusion, dpi=80), step,
                              dataformats="HWC")
        self.writer.add_text("validation", f"{result.errors} errors of {result.total} images "
                             f"(accuracy {100 * result.accuracy:.2f}%) on {result.source}", step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
