"""Ensembles: members with different seeds, averaged probabilities, parallel jobs, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from digitlab.cli import main
from digitlab.data import DigitData, write_kaggle_csv
from digitlab.ensemble import train_ensemble
from digitlab.inference import load_predictor
from digitlab.presets import get_preset


@pytest.fixture(scope="module")
def csv_1000(tmp_path_factory, mnist_train: DigitData) -> Path:
    path = tmp_path_factory.mktemp("ens") / "train.csv"
    write_kaggle_csv(path, mnist_train.subset(np.arange(20000, 21000)))
    return path


def _config(csv: Path):
    return get_preset("fast").with_overrides(data=f"kaggle:{csv}", epochs=4, batch_size=32, val_split=0.2)


@pytest.mark.slow
def test_two_member_ensemble_averages_member_probabilities(tmp_path: Path, csv_1000: Path,
                                                           mnist_test: DigitData) -> None:
    out = train_ensemble(_config(csv_1000), tmp_path / "ens", members=2, first_seed=5)
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"] and manifest["seeds"] == [5, 6]
    images = mnist_test.images[:500]
    ensemble = load_predictor(out)
    assert ensemble.members == 2
    singles = [load_predictor(out / name, calibrated=False).predict_proba(images) for name in manifest["members"]]
    assert not np.allclose(singles[0], singles[1])  # different seeds, different models
    np.testing.assert_allclose(ensemble.predict_proba(images), (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-7)
    accuracy = (ensemble.predict_proba(images).argmax(1) == mnist_test.labels[:500]).mean()
    assert accuracy > 0.8
    # one split for all members (split seed = the first seed): their held-out images measure the
    # ensemble, none of them left out as seen in training
    metas = [json.loads((out / name / "model.json").read_text()) for name in manifest["members"]]
    assert [m["config"]["split_seed"] for m in metas] == [5, 5] and [m["config"]["seed"] for m in metas] == [5, 6]
    assert metas[0]["data"]["val_fingerprint"] == metas[1]["data"]["val_fingerprint"]
    from digitlab.evaluate import evaluate_run

    held_out = evaluate_run(out)
    assert held_out.extra["seen_in_training"] == 0 and held_out.total == held_out.extra["source_count"] > 190


@pytest.mark.slow
def test_parallel_jobs_and_rerun_skips_finished_members(tmp_path: Path, csv_1000: Path, capsys) -> None:
    argv = ["ensemble", "--preset", "fast", "--data", f"kaggle:{csv_1000}", "--members", "2", "--jobs", "2",
            "--epochs", "1", "--batch-size", "64", "--val-split", "0.2", "--out", str(tmp_path / "ens")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 to train, 2 at a time" in err
    for i in range(2):
        assert (tmp_path / "ens" / f"member-{i}" / "model.json").is_file()
    assert main(argv) == 0
    assert "0 to train" in capsys.readouterr().err
    # members written before the photometric augmentation fields existed are still this recipe's
    member_config = tmp_path / "ens" / "member-1" / "config.json"
    recorded = json.loads(member_config.read_text())
    for key in ("thickness", "blur", "low_resolution", "noise", "background"):
        del recorded["config"]["augment"][key]
    member_config.write_text(json.dumps(recorded))
    assert main(argv) == 0
    assert "0 to train" in capsys.readouterr().err
    # the same folder asked for another recipe, or a run folder as --out: refused before any training
    other = [a if a != "fast" else "quick" for a in argv]
    assert main(other) == 2
    assert "member-0: was trained with preset 'fast', this command asks for 'quick'" in capsys.readouterr().err
    run_as_out = [*argv[:-1], str(tmp_path / "ens" / "member-0")]
    assert main(run_as_out) == 2
    assert "holds a training run; give the ensemble a folder of its own" in capsys.readouterr().err


def test_presets_cycle_and_logloss_weights_reach_every_consumer(tmp_path: Path, csv_1000: Path,
                                                                mnist_test: DigitData, capsys) -> None:
    from digitlab.evaluate import evaluate_run
    from digitlab.export import _load_torch

    out = tmp_path / "mixed"
    argv = ["ensemble", "--presets", "fast,quick", "--members", "3", "--data", f"kaggle:{csv_1000}", "--epochs", "1",
            "--batch-size", "64", "--val-split", "0.2", "--seed", "11", "--weights", "logloss", "--out", str(out)]
    assert main(argv) == 0
    assert "member 1 (quick, seed 12) started" in capsys.readouterr().err
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["presets"] == ["fast", "quick", "fast"] and manifest["seeds"] == [11, 12, 13]
    metas = [json.loads((out / m / "model.json").read_text()) for m in manifest["members"]]
    assert [m["model"] for m in metas] == ["fast", "seed2017", "fast"]  # architectures differ, not only seeds
    inverse = np.array([1 / m["metrics"]["val_loss"] for m in metas])
    np.testing.assert_allclose(manifest["weights"], inverse / inverse.sum(), rtol=1e-12)
    assert not np.allclose(manifest["weights"], 1 / 3)

    images = mnist_test.images[:300]
    # members' own temperatures are not used inside an ensemble: it averages their raw probabilities
    singles = np.stack([load_predictor(out / m, precision="fp32", calibrated=False).predict_proba(images)
                        for m in manifest["members"]])
    weighted = np.tensordot(np.array(manifest["weights"]), singles, axes=1)
    ensemble = load_predictor(out, precision="fp32")  # fp32 like the exported module below
    np.testing.assert_allclose(ensemble.predict_proba(images), weighted, rtol=1e-5, atol=1e-6)
    import torch

    module, _ = _load_torch(out)  # what export and serve (ONNX backend) run
    with torch.no_grad():
        exported = torch.softmax(module(torch.from_numpy(images).float().div(255).unsqueeze(1)), dim=1).numpy()
    np.testing.assert_allclose(exported, weighted, rtol=1e-4, atol=1e-5)

    # the default evaluation set: the members' shared held-out split, which none of them trained on
    result = evaluate_run(out)
    assert result.source == f"kaggle:{csv_1000}[val]" and result.extra["seen_in_training"] == 0
    assert result.total == metas[0]["data"]["val_count"] == metas[2]["data"]["val_count"]


def test_logloss_weights_need_validation_loss(tmp_path: Path) -> None:
    from digitlab.ensemble import logloss_weights
    from digitlab.errors import DigitlabError

    for name, loss in (("a", 0.1), ("b", 0.3), ("c", None)):
        (tmp_path / name).mkdir()
        metrics = {} if loss is None else {"val_loss": loss}
        (tmp_path / name / "model.json").write_text(json.dumps({"model": "fast", "model_args": {}, "metrics": metrics}))
    assert logloss_weights([tmp_path / "a", tmp_path / "b"]) == pytest.approx([0.75, 0.25])
    with pytest.raises(DigitlabError, match="no validation log-loss"):
        logloss_weights([tmp_path / "a", tmp_path / "c"])


def test_unknown_preset_in_list_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["ensemble", "--presets", "fast,nope", "--members", "2", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err


def test_forward_selection_picks_complementary_members_and_stops() -> None:
    from digitlab.ensemble import forward_selection

    labels = np.array([0, 0, 1, 1])
    sure, unsure = [0.9, 0.1], [0.4, 0.6]
    a = np.array([sure, sure, unsure[::-1], unsure[::-1]])  # sure of the 0s, slightly wrong on the 1s
    b = np.array([unsure, unsure, sure[::-1], sure[::-1]])  # the opposite
    c = np.full((4, 2), 0.45)  # never more than 45% on the truth
    c[:, 1] = 0.55
    c[2:] = c[2:, ::-1]
    # a alone (log-loss 0.51), then b (the mean gives 0.65 to every truth: 0.43); a third pick of any
    # member raises the loss, so it stops there and c never helps
    assert forward_selection(np.stack([c, a, b]), labels, max_picks=10) == [1, 2]
    perfect = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.01, 0.99]])
    assert forward_selection(np.stack([a, perfect, b]), labels, max_picks=10) == [1]


def test_greedy_weights_are_fitted_on_the_shared_validation_split(tmp_path: Path, csv_1000: Path, capsys) -> None:
    from digitlab.ensemble import calibrated_nll, forward_selection, greedy_weights
    from digitlab.errors import DigitlabError
    from digitlab.overlap import validation_data

    out = tmp_path / "greedy"
    argv = ["ensemble", "--presets", "fast,quick", "--members", "3", "--data", f"kaggle:{csv_1000}", "--epochs", "1",
            "--batch-size", "64", "--val-split", "0.2", "--seed", "3", "--weights", "greedy", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "member 2 (fast, seed 5) started" in printed.err and "member 2 finished" in printed.err
    assert "epoch" not in printed.err + printed.out  # --quiet: the members' training lines stay out
    manifest = json.loads((out / "ensemble.json").read_text())
    members = [out / m for m in manifest["members"]]
    val = validation_data(members[0])
    probs = np.stack([load_predictor(m, calibrated=False).predict_proba(val.images) for m in members])
    picks = forward_selection(probs, val.labels, 6)
    expected = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(manifest["weights"], expected)
    assert manifest["weighting"] == "greedy"
    # the fitted mix is at least as good on validation as any single member (after temperature scaling)
    mixed = np.tensordot(np.array(manifest["weights"]), probs, axes=1)
    assert calibrated_nll(mixed, val.labels) <= min(calibrated_nll(p, val.labels) for p in probs) + 1e-9

    # a run that trained on the validation images cannot take part
    assert main(["train", "--preset", "fast", "--data", f"kaggle:{csv_1000}", "--epochs", "1", "--batch-size", "64",
                 "--val-split", "0", "--out", str(tmp_path / "all"), "--quiet"]) == 0
    with pytest.raises(DigitlabError, match="trained on images of the ensemble's validation split"):
        greedy_weights([members[0], tmp_path / "all"])


def test_calibrated_nll_ignores_the_confidence_scale() -> None:
    from digitlab.calibration import apply_temperature, nll
    from digitlab.ensemble import calibrated_nll

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10))
    logits[np.arange(500), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    flat = apply_temperature(probs, 3.0)  # as a label-smoothed net: same ranking, less confident
    assert nll(flat, labels) > nll(probs, labels) + 0.1
    assert calibrated_nll(flat, labels) == pytest.approx(calibrated_nll(probs, labels), abs=1e-3)


def test_fitted_weights_without_validation_data_are_refused_before_training(tmp_path: Path) -> None:
    from digitlab.errors import DigitlabError

    for weights in ("greedy", "logloss"):
        with pytest.raises(DigitlabError, match=f"--weights {weights} needs validation data"):
            train_ensemble(get_preset("fast").with_overrides(val_split=0.0), tmp_path / weights, 2, weights=weights)
        assert not (tmp_path / weights / "member-0").exists()


def test_shared_validation_drops_duplicates_of_training_images_and_refuses_other_splits(tmp_path: Path) -> None:
    from digitlab.checkpoint import write_train_hashes
    from digitlab.data.dataset import image_hashes
    from digitlab.data.split import split
    from digitlab.ensemble import shared_validation
    from digitlab.errors import DigitlabError

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 10)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    train_idx, val_idx = split(labels, 0.2, 5)
    images[train_idx[0]] = images[val_idx[0]]  # the same digit twice in the data, once on each side
    csv = write_kaggle_csv(tmp_path / "train.csv", DigitData(images, labels, "synthetic"))
    config = {"data": f"kaggle:{csv}", "val_split": 0.2, "seed": 9, "split_seed": 5}
    runs = []
    for name, overrides in (("a", {}), ("b", {"seed": 10}), ("other", {"split_seed": 6})):
        run = tmp_path / name
        run.mkdir()
        meta = {"model": "fast", "model_args": {}, "config": {**config, **overrides}}
        (run / "model.json").write_text(json.dumps(meta))
        write_train_hashes(run, image_hashes(images[train_idx]))
        runs.append(run)

    val = shared_validation(runs[:2])
    assert len(val) == len(val_idx) - 1  # the duplicate is left out, the split is not refused
    assert not np.isin(image_hashes(val.images), image_hashes(images[train_idx])).any()
    with pytest.raises(DigitlabError, match="trained on images of the ensemble's validation split"):
        shared_validation([runs[0], runs[2]])
