"""Per-image hashes, the training-image record, overlap-free evaluation and its defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from digitlab.checkpoint import TRAIN_HASHES_FILE, read_train_hashes, write_train_hashes
from digitlab.cli import main
from digitlab.data import DigitData, image_hashes, load_source, split, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate_run, wilson_interval
from digitlab.overlap import check_seen, run_train_hashes, source_overlap, trained_on_mnist


def test_image_hashes_follow_pixels_not_labels_or_format(mnist_test: DigitData, tmp_path: Path) -> None:
    data = mnist_test.subset(np.arange(50))
    hashes = data.image_hashes()
    assert hashes.dtype == np.uint64 and hashes.shape == (50,)
    assert len(np.unique(hashes)) == 50
    changed = data.images.copy()
    changed[7, 14, 14] ^= 1  # one pixel, one grey level
    other = image_hashes(changed)
    assert (other != hashes).sum() == 1 and other[7] != hashes[7]
    relabelled = DigitData(data.images, (data.labels + 1) % 10, "relabelled")  # type: ignore[operator]
    assert np.array_equal(relabelled.image_hashes(), hashes)
    csv = write_kaggle_csv(tmp_path / "a.csv", data)
    assert np.array_equal(load_source(f"kaggle:{csv}").image_hashes(), hashes)


def test_train_hashes_file_round_trip(tmp_path: Path) -> None:
    assert read_train_hashes(tmp_path) is None
    write_train_hashes(tmp_path, np.array([5, 3, 5, 2**63 + 1], dtype=np.uint64))
    assert read_train_hashes(tmp_path).tolist() == [3, 5, 2**63 + 1]  # type: ignore[union-attr]
    np.save(tmp_path / TRAIN_HASHES_FILE, np.array([1.5]))
    with pytest.raises(DigitlabError, match="uint64"):
        read_train_hashes(tmp_path)


@pytest.fixture(scope="module")
def pair(mnist_test: DigitData, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A = test[0:300], B = test[200:500] with 10 of the 100 shared images relabelled."""
    folder = tmp_path_factory.mktemp("pair")
    a = mnist_test.subset(np.arange(300))
    b = mnist_test.subset(np.arange(200, 500))
    labels = b.labels.copy()  # type: ignore[union-attr]
    labels[:10] = (labels[:10] + 1) % 10
    b = DigitData(b.images, labels, "b")
    return f"kaggle:{write_kaggle_csv(folder / 'a.csv', a)}", f"kaggle:{write_kaggle_csv(folder / 'b.csv', b)}"


def test_source_overlap_counts(pair: tuple[str, str]) -> None:
    info = source_overlap(load_source(pair[0]), load_source(pair[1]))
    assert (info["a_count"], info["b_count"], info["a_in_b"], info["b_in_a"]) == (300, 300, 100, 100)
    assert info["distinct_shared"] == 100
    assert info["label_disagreements"] == 10
    unlabelled = load_source(pair[1])
    info = source_overlap(load_source(pair[0]), DigitData(unlabelled.images, None, "b-no-labels"))
    assert info["a_in_b"] == 100 and info["label_disagreements"] is None


def test_cli_data_overlap(pair: tuple[str, str], capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "overlap", *pair]) == 0
    out = capsys.readouterr().out
    assert f"100 of 300 images of {pair[0]} are also in {pair[1]}" in out
    assert "10 shared images" in out
    assert main(["data", "overlap", *pair, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label_disagreements"] == 10


def test_trained_on_mnist() -> None:
    assert all(trained_on_mnist(s) for s in ("mnist", "mnist:train", "idx:/d", "idx:/d:train"))
    assert not any(trained_on_mnist(s) for s in ("mnist:test", "idx:/d:test", "kaggle:train.csv", "images:/x"))


# ---------------------------------------------------------------- a run that trained on MNIST


def test_mnist_run_records_its_training_images(tiny_run: Path, small_mnist) -> None:
    recorded = read_train_hashes(tiny_run)
    assert recorded is not None
    assert np.array_equal(recorded, np.unique(small_mnist[0].image_hashes()))
    assert not np.isin(small_mnist[1].image_hashes(), recorded).any()  # validation images are not in it


def test_seen_images_are_left_out_by_default(tiny_run: Path, mnist_train: DigitData) -> None:
    # tiny_run trained on mnist:train[:3000]; this slice holds 500 of those and 500 others
    data = mnist_train.subset(np.arange(2500, 3500), "slice")
    result = evaluate_run(tiny_run, data)
    assert result.total == 500 and result.extra["source_count"] == 1000
    assert result.extra["seen_in_training"] == 500 and result.extra["seen_included"] is False
    assert result.extra["notes"] == ["500 of 1,000 images were in the training data and are left out"]
    assert all(m.index >= 500 for m in result.misclassified)  # indices into the named source
    assert "seen in training: 500 left out" in result.to_text()
    assert result.fingerprint == data.subset(np.arange(500, 1000), "unseen").fingerprint != data.fingerprint
    kept = evaluate_run(tiny_run, data, include_seen=True)
    assert kept.total == 1000 and kept.extra["seen_in_training"] == 500 and kept.fingerprint == data.fingerprint
    assert "WARNING" in kept.extra["notes"][0] and "COUNTED" in kept.extra["notes"][0]
    with pytest.raises(DigitlabError, match="--include-seen"):
        evaluate_run(tiny_run, mnist_train.subset(np.arange(100), "all seen"))


def test_mnist_run_defaults_to_mnist_test(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "mnist:test" and out["total"] == 10_000
    assert out["seen_in_training"] == 0 and "trained on MNIST" in out["data_choice"]


def test_run_without_hash_record_warns_and_still_evaluates(tiny_run: Path, mnist_test: DigitData,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    (old / TRAIN_HASHES_FILE).unlink()
    result = evaluate_run(old, mnist_test.subset(np.arange(200)))
    assert result.total == 200 and result.extra["seen_in_training"] is None
    assert result.extra["overlap_checked"] is False
    assert len(result.extra["notes"]) == 1 and "could not be checked" in result.extra["notes"][0]
    assert "seen in training: not checked" in result.to_text()
    idx = tmp_path / "idx"
    from digitlab.data import write_idx_dir

    write_idx_dir(idx, mnist_test.subset(np.arange(200)), split="test")
    assert main(["evaluate", str(old), "--data", f"idx:{idx}:test"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("could not be checked") == 1


def test_ensemble_hashes_are_the_members_union(tiny_run: Path, tmp_path: Path) -> None:
    from digitlab.ensemble import MemberPlan, _write_union_hashes

    ens = tmp_path / "ens"
    for name in ("member-0", "member-1"):
        shutil.copytree(tiny_run, ens / name)
    write_train_hashes(ens / "member-1", np.array([1, 2, 3], dtype=np.uint64))
    (ens / "ensemble.json").write_text(json.dumps({"kind": "ensemble", "members": ["member-0", "member-1"]}))
    own = read_train_hashes(tiny_run)
    expected = np.union1d(own, [1, 2, 3])  # type: ignore[arg-type]
    assert np.array_equal(run_train_hashes(ens), expected)  # read from the members
    _write_union_hashes(ens, [MemberPlan(0, 0, ens / "member-0"), MemberPlan(1, 1, ens / "member-1")])
    assert np.array_equal(read_train_hashes(ens), expected)  # written by the ensemble
    (ens / "member-1" / TRAIN_HASHES_FILE).unlink()
    (ens / TRAIN_HASHES_FILE).unlink()
    assert run_train_hashes(ens) is None  # one member unknown: the union is unknown


# ---------------------------------------------------------------- a run that trained on a Kaggle-style CSV


@pytest.fixture(scope="module")
def kaggle_run(mnist_test: DigitData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """quick preset, 1 epoch on a 1,000-row train.csv cut from mnist:test (~800 train / ~200 val)."""
    from digitlab.presets import get_preset
    from digitlab.train import fit

    folder = tmp_path_factory.mktemp("kaggle")
    csv = write_kaggle_csv(folder / "train.csv", mnist_test.subset(np.arange(1000)))
    config = get_preset("quick").with_overrides(data=f"kaggle:{csv}", val_split=0.2, epochs=1, batch_size=64,
                                                seed=3)
    fit(config, folder / "run")
    return folder / "run", csv


def test_kaggle_run_defaults_to_its_held_out_split(kaggle_run: tuple[Path, Path]) -> None:
    run, csv = kaggle_run
    _, val_idx = split(load_source(f"kaggle:{csv}").labels, 0.2, 3)  # type: ignore[arg-type]
    result = evaluate_run(run)
    meta = json.loads((run / "model.json").read_text())
    assert result.source == f"kaggle:{csv}[val]" and result.total == len(val_idx) == meta["data"]["val_count"]
    assert result.fingerprint == meta["data"]["val_fingerprint"]  # the very split training held out
    assert result.extra["seen_in_training"] == 0
    assert "held-out validation split" in result.extra["data_choice"] and "seed 3" in result.extra["data_choice"]


def test_kaggle_run_on_mnist_test_leaves_its_training_images_out(kaggle_run: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture) -> None:
    run, _ = kaggle_run
    # mnist:test[:1000] made the CSV, its training part trained the run: the case in small
    n = json.loads((run / "model.json").read_text())["data"]["train_count"]
    assert 790 < n < 810
    assert main(["evaluate", str(run), "--data", "mnist:test", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["seen_in_training"] == n and out["total"] == 10_000 - n
    assert f"{n} of 10,000 images were in the training data and are left out" in captured.err
    assert main(["evaluate", str(run), "--data", "mnist:test", "--include-seen"]) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and f"seen in training: {n} counted" in captured.out
    assert f"WARNING: {n} of 10,000" in captured.err


def test_report_states_the_set_and_the_overlap(kaggle_run: tuple[Path, Path], tmp_path: Path) -> None:
    from digitlab.report import write_report

    run, _ = kaggle_run
    n = json.loads((run / "model.json").read_text())["data"]["train_count"]
    html = write_report(run, out=tmp_path / "r.html").read_text()
    assert "held-out validation split" in html and "images seen in training" in html
    forecast = evaluate_run(run).extra["expected_leaderboard"]  # the held-out split: a forecast card
    assert f"{100 * forecast['low95']:.2f}–{100 * forecast['high95']:.2f}%" in html
    assert "expected on unseen data like it, e.g. a Kaggle leaderboard (95% interval)" in html
    html = write_report(run, data="mnist:test", out=tmp_path / "m.html").read_text()
    assert f"{n} of 10,000 images were in the training data and are left out" in html
    assert f"{n} left out" in html and "e.g. a Kaggle leaderboard" not in html  # mnist:test is no held-out fold


def test_check_seen_without_record_keeps_everything(mnist_test: DigitData) -> None:
    data = mnist_test.subset(np.arange(10))
    check = check_seen(data, None)
    assert check.seen is None and len(check.keep) == 10 and "could not be checked" in (check.message or "")


def test_expected_leaderboard_interval_on_the_held_out_split(kaggle_run: tuple[Path, Path]) -> None:
    run, _ = kaggle_run
    result = evaluate_run(run)
    expected = result.to_dict()["expected_leaderboard"]
    low, high = wilson_interval(result.correct, result.total)
    assert expected["low95"] == low < result.accuracy < high == expected["high95"]
    assert "expected on unseen data like it" in result.to_text()
    assert "expected_leaderboard" not in evaluate_run(run, "mnist:test").to_dict()  # not its own fold


def test_wilson_interval_known_values() -> None:
    # Wilson 95% for 95/100: 0.8883..0.9785 (textbook value); for 100/100 the top is exactly 1
    low, high = wilson_interval(95, 100)
    assert abs(low - 0.8883) < 5e-4 and abs(high - 0.9785) < 5e-4
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(100, 100)[0] < 1.0
    with pytest.raises(DigitlabError):
        wilson_interval(0, 0)


def test_predict_json_flags_training_images(tiny_run: Path, mnist_train: DigitData, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    csv = write_kaggle_csv(tmp_path / "labelled.csv", mnist_train.subset(np.arange(2990, 3010)))
    assert main(["predict", str(tiny_run), f"kaggle:{csv}", "--format", "json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["seen_in_training"] for r in rows] == [True] * 10 + [False] * 10
    assert "10 of 20 images were in the training data" in captured.err
