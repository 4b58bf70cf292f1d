"""digitlab.figures: plain matplotlib Figures drawn from the run's own numbers, used by the HTML report,
and fit's progress bars (on by default, off with progress=False, never in the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from digitlab import figures
from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.presets import get_preset
from digitlab.rundir import read_metrics
from digitlab.train import fit


@pytest.fixture(scope="module")
def tiny(mnist_train: DigitData) -> tuple[DigitData, DigitData]:
    return (mnist_train.subset(np.arange(320), "mnist:train[:320]"),
            mnist_train.subset(np.arange(50000, 50100), "mnist:train[50000:50100]"))


def _config(epochs: int = 2):
    return get_preset("fast").with_overrides(epochs=epochs, batch_size=32, epoch_fraction=1.0)


def test_curves_plot_the_records_numbers(tmp_path: Path, tiny) -> None:
    result = fit(_config(), tmp_path / "run", data=tiny, progress=False)
    records = read_metrics(result.run_dir)
    losses = [r["loss"] for r in records if r["type"] == "batch"]

    fig = figures.batch_loss_figure(records)
    assert isinstance(fig, Figure)
    raw, smoothed = fig.axes[0].lines
    np.testing.assert_allclose(raw.get_ydata(), losses)
    np.testing.assert_allclose(smoothed.get_ydata(), figures.smooth(np.array(losses)))
    np.testing.assert_allclose(raw.get_xdata()[[9, 19]], [1.0, 2.0])  # x in epochs: 10 steps per epoch

    fig = figures.epoch_curves_figure(records)
    ax_loss, ax_acc = fig.axes
    by_label = {line.get_label(): line for line in ax_acc.lines}
    np.testing.assert_allclose(by_label["validation"].get_ydata(), [r["val_acc"] for r in result.history])
    np.testing.assert_allclose(by_label["train"].get_ydata(), [r["train_acc"] for r in result.history])
    val_loss = next(line for line in ax_loss.lines if line.get_label() == "validation")
    np.testing.assert_allclose(val_loss.get_ydata(), [r["val_loss"] for r in result.history])

    both = figures.epoch_curves_figure({"a": records, "b": records[: len(records) // 2]})
    assert {line.get_label() for line in both.axes[1].lines} == {"a train", "a validation", "b train",
                                                                   "b validation"}


def test_drawing_never_touches_pyplot() -> None:
    """So a notebook keeps its inline backend and nothing piles up in pyplot's figure list."""
    code = """
import sys
import numpy as np
from digitlab import figures
from digitlab.data import DigitData
from digitlab.evaluate import evaluate_predictions
data = DigitData(np.random.default_rng(0).integers(0, 255, (30, 28, 28), dtype=np.uint8),
                 np.arange(30) % 10, "random")
probs = np.random.default_rng(1).dirichlet(np.ones(10), 30)
result = evaluate_predictions(probs, data.labels)
records = [{"type": "batch", "epoch": 1, "step": s, "loss": 1 / s} for s in range(1, 5)]
records.append({"type": "epoch", "epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.9})
drawn = [figures.sample_grid_figure(data), figures.batch_loss_figure(records), figures.epoch_curves_figure(records),
         figures.training_curves_figure(records), figures.confusion_figure(result.confusion),
         figures.per_class_error_figure(result), figures.mistakes_figure(data.images, result.misclassified)]
assert all(figures.figure_png(f).startswith(b"\\x89PNG") for f in drawn)
assert figures.figure_rgb(drawn[-1]).shape[2] == 3
print("matplotlib.pyplot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_report_draws_with_these_very_functions(tiny_run: Path, mnist_test: DigitData, tmp_path: Path,
                                                    monkeypatch) -> None:
    from digitlab.report import write_report

    called: list[str] = []
    for name in ("sample_grid_figure", "training_curves_figure", "confusion_figure", "per_class_error_figure",
                 "mistakes_figure"):
        original = getattr(figures, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(figures, name, spy)
    write_report(tiny_run, mnist_test.subset(np.arange(300), "mnist:test[:300]"), tmp_path / "report.html")
    assert sorted(called) == ["confusion_figure", "mistakes_figure", "per_class_error_figure", "sample_grid_figure",
                              "training_curves_figure"]


def test_fit_shows_progress_bars_unless_told_not_to(tmp_path: Path, tiny, capsys) -> None:
    fit(_config(), tmp_path / "on", data=tiny)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "10/10" in err and "val_acc" in err
    fit(_config(), tmp_path / "off", data=tiny, progress=False)
    assert capsys.readouterr().err == ""


def test_the_cli_keeps_its_own_output(tmp_path: Path, mnist_train: DigitData, capsys) -> None:
    csv = write_kaggle_csv(tmp_path / "train.csv", mnist_train.subset(np.arange(400)))
    assert main(["train", "--preset", "fast", "--data", f"kaggle:{csv}", "--batch-size", "32", "--epochs", "1",
                 "--val-split", "0.2", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "epoch   1/1  loss" in err  # TrainingProgress's epoch line
    assert "batch/s" not in err and "it/s" not in err  # no tqdm bar beside it
