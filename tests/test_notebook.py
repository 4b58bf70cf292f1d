"""examples/digit-recognizer.ipynb: committed without outputs, and it runs top to bottom in a real
Jupyter kernel (nbclient) on a few hundred rows for one epoch, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from digitlab.data import DigitData, split, write_kaggle_csv
from digitlab.predict import read_submission

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "digit-recognizer.ipynb"
FIGURE_CELLS = 7  # samples, batch loss, epoch curves (x2), confusion, per-class errors, mistakes


def test_the_repository_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert [(c.outputs, c.execution_count) for c in code] == [([], None)] * len(code)


@pytest.mark.slow
def test_the_notebook_runs_on_a_small_csv(tmp_path: Path, monkeypatch, mnist_train: DigitData,
                                          mnist_test: DigitData) -> None:
    train_csv = write_kaggle_csv(tmp_path / "train.csv", mnist_train.subset(np.arange(400)))
    test_csv = write_kaggle_csv(tmp_path / "test.csv", mnist_test.subset(np.arange(57)), with_labels=False)
    for name, value in {"TRAIN_CSV": train_csv, "TEST_CSV": test_csv, "EPOCHS": 1, "LIMIT": 300,
                        "BATCH_SIZE": 32, "PRESET": "fast-long"}.items():
        monkeypatch.setenv(f"DIGITLAB_NB_{name}", str(value))  # the kernel inherits this environment
    work = tmp_path / "work"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # any cell that raises fails the run (CellExecutionError)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    labels = read_submission(work / "submission.csv", expected_rows=57)  # header, ids 1..57, labels 0..9
    assert (work / "submission.csv").read_text().splitlines()[0] == "ImageId,Label"
    assert len(labels) == 57
    runs = sorted(p.name for p in (work / "runs").iterdir())
    assert [name.split("-2")[0] for name in runs] == ["fast-long", "seed2017"]
    assert all((work / "runs" / name / "model.safetensors").is_file() for name in runs)

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    train_index, val_index = split(mnist_train.labels[:300], 0.2, seed=0)
    assert "300 digits" in text and f"train {len(train_index)}, validation {len(val_index)}" in text  # LIMIT, split
    assert "epoch 1/1" in text  # the progress bars
    assert text.count("[CV]:") == 2
    figures = [c for c in notebook.cells if c.cell_type == "code"
               and any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) == FIGURE_CELLS  # every figure is shown inline, once
    assert all(sum("image/png" in o.get("data", {}) for o in c.outputs) == 1 for c in figures)
