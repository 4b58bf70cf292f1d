"""`digitlab kaggle`: a forecast on a fold no member trained on, then a submission from all rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from digitlab import ensemble, evaluate
from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.kaggle_recipe import fold_recipes
from digitlab.overlap import run_train_hashes, validation_data
from digitlab.presets import get_preset


@pytest.mark.slow
def test_forecast_on_an_unseen_fold_then_submission(tmp_path: Path, mnist_train: DigitData, mnist_test: DigitData,
                                                   capsys) -> None:
    write_kaggle_csv(tmp_path / "train.csv", mnist_train.subset(np.arange(30000, 32400)))
    write_kaggle_csv(tmp_path / "test.csv", mnist_test.subset(np.arange(300)), with_labels=False)
    out = tmp_path / "kaggle"
    argv = ["kaggle", str(tmp_path / "train.csv"), str(tmp_path / "test.csv"), "--presets", "fast,quick",
            "--members", "2", "--holdout", "0.2", "--epochs", "1", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    forecast = json.loads((out / "forecast.json").read_text())
    # the fold: 20% of 2,400 rows, held out by both members alike, none of it trained on
    fold = validation_data(out / "fold")
    assert fold is not None and len(fold) == forecast["images"] + forecast["left_out_as_seen"]
    assert 470 <= len(fold) <= 490
    assert not np.isin(fold.image_hashes(), run_train_hashes(out / "fold")).any()
    assert forecast["low95"] < forecast["accuracy"] < forecast["high95"] and forecast["accuracy"] > 0.3  # chance: 0.1
    assert forecast["presets"] == ["fast", "quick"] and forecast["tta"] is True
    assert f"expected leaderboard accuracy {100 * forecast['accuracy']:.2f}%" in captured.out
    # the submission ensemble trained on every row
    for member in ("member-0", "member-1"):
        meta = json.loads((out / "full" / member / "model.json").read_text())
        assert meta["data"]["train_count"] == 2400 and meta["config"]["val_split"] == 0
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 301 and lines[1].startswith("1,")
    assert "wrote" in captured.out and "(300 rows)" in captured.out
    # run again: nothing left to train, the same files
    before = (out / "submission.csv").read_text()
    assert main(argv) == 0
    assert (out / "submission.csv").read_text() == before
    assert "started" not in capsys.readouterr().err


def test_bad_holdout_and_missing_files(tmp_path: Path, capsys) -> None:
    with pytest.raises(DigitlabError, match=r"holdout must be in \(0, 1\)"):
        fold_recipes([get_preset("fast")], tmp_path / "train.csv", 1.0, 0)
    assert main(["kaggle", str(tmp_path / "nope.csv"), str(tmp_path / "test.csv")]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def _never_trains(*args, **kwargs):
    raise AssertionError("trained before TEST_CSV was checked")


def test_bad_test_csv_is_refused_before_any_training(tmp_path: Path, mnist_test: DigitData, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.setattr(ensemble, "train_ensemble", _never_trains)
    train = write_kaggle_csv(tmp_path / "train.csv", mnist_test.subset(np.arange(5)))
    out = tmp_path / "kaggle"
    assert main(["kaggle", str(train), str(train), "--out", str(out)]) == 2  # train.csv given twice
    assert capsys.readouterr().err == \
        f"digitlab: error: {train}: has a label column, expected pixels only (test.csv form)\n"
    test = write_kaggle_csv(tmp_path / "test.csv", mnist_test.subset(np.arange(5)), with_labels=False)
    lines = test.read_text().splitlines()
    lines[3] = "x" + lines[3]
    test.write_text("\n".join(lines) + "\n")
    assert main(["kaggle", str(train), str(test), "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith(f"{test}: line 4: pixel0 is 'x0', expected an integer\n")
    assert not out.exists()


def test_test_csv_failing_after_training_shows_why(tmp_path: Path, mnist_test: DigitData, tiny_run: Path,
                                                   monkeypatch, capsys) -> None:
    train = write_kaggle_csv(tmp_path / "train.csv", mnist_test.subset(np.arange(5)))
    test = write_kaggle_csv(tmp_path / "test.csv", mnist_test.subset(np.arange(5)), with_labels=False)

    def train_then_damage_test_csv(recipes, out: Path, *args, **kwargs) -> Path:
        if out.name == "full":  # test.csv edited while the ensembles trained
            test.write_text(test.read_text().replace("\n0,", "\n-1,", 1))
        return tiny_run

    monkeypatch.setattr(ensemble, "train_ensemble", train_then_damage_test_csv)
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, tta: SimpleNamespace(
        extra={"expected_leaderboard": {"accuracy": 0.9, "low95": 0.8, "high95": 0.95, "images": 5}}, source="x"))
    assert main(["kaggle", str(train), str(test), "--out", str(tmp_path / "kaggle")]) == 2
    assert capsys.readouterr().err.endswith(f"digitlab: error: {test}: line 2: pixel0 is -1, outside 0..255\n")
    assert not (tmp_path / "kaggle" / "submission.csv").exists()


def test_one_cycle_with_too_few_steps_is_one_clear_error(tmp_path: Path, mnist_train: DigitData) -> None:
    from digitlab.train import fit

    write_kaggle_csv(tmp_path / "tiny.csv", mnist_train.subset(np.arange(600)))
    config = get_preset("quick").with_overrides(data=f"kaggle:{tmp_path / 'tiny.csv'}", epochs=1)
    with pytest.raises(DigitlabError, match="one-cycle schedule needs more than one warm-up step"):
        fit(config, tmp_path / "run", progress=False)


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)])
def test_kaggle_takes_the_graphs_flag_for_every_recipe(flag: list[str], expected: bool | None, tmp_path: Path,
                                                       monkeypatch) -> None:
    """On a GPU the members train as CUDA graphs by default; --no-cuda-graphs is the way out that a
    failed capture's message names."""
    import digitlab.kaggle_recipe

    seen: list = []

    def capture(train_csv, test_csv, recipes, out, **kwargs):
        seen.extend(recipes)
        return SimpleNamespace(submission=Path(out) / "submission.csv", rows=0)

    monkeypatch.setattr(digitlab.kaggle_recipe, "kaggle_recipe", capture)
    argv = ["kaggle", "train.csv", "test.csv", "--presets", "best,fast", "--out", str(tmp_path), *flag]
    assert main(argv) == 0
    assert [r.preset for r in seen] == ["best", "fast"] and all(r.cuda_graphs is expected for r in seen)
