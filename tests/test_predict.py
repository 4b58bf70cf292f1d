"""Predict: Kaggle submission, csv/json output, IDX/.npy/image inputs, bad files, TTA, printed digits."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from digitlab.cli import main
from digitlab.data import DigitData, write_idx, write_kaggle_csv
from digitlab.errors import DigitlabError
from digitlab.inference import load_predictor, tta_proba
from digitlab.predict import predict_inputs, read_submission, submission_csv, validate_submission

FONT = font_manager.findfont("DejaVu Sans")


@pytest.fixture(scope="module")
def digits(mnist_test: DigitData) -> DigitData:
    return mnist_test.subset(np.arange(300), "mnist:test[:300]")


@pytest.fixture(scope="module")
def expected(tiny_run: Path, digits: DigitData) -> np.ndarray:
    return load_predictor(tiny_run).predict_proba(digits.images).argmax(1)


@pytest.fixture(scope="module")
def test_csv(digits: DigitData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kaggle_csv(tmp_path_factory.mktemp("kaggle") / "test.csv", digits, with_labels=False)


def render_digit(digit: int, at: tuple[int, int] = (60, 15), size: tuple[int, int] = (300, 200)) -> Image.Image:
    """A printed digit in dark blue on white, off-centre on a large canvas."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text(at, str(digit), fill=(10, 20, 80), font=ImageFont.truetype(FONT, 150))
    return img


# ---------------------------------------------------------------- Kaggle


def test_kaggle_submission(tiny_run: Path, test_csv: Path, expected: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    assert main(["predict", str(tiny_run), f"kaggle:{test_csv}", "--format", "kaggle", "--out", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ImageId", "Label"]
    assert len(rows) == 1 + len(expected)
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(expected) + 1))
    labels = np.array([int(r[1]) for r in rows[1:]])
    assert set(labels) <= set(range(10))
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(read_submission(out, expected_rows=300), expected)


def test_kaggle_default_out_and_plain_csv_path(tiny_run: Path, test_csv: Path, expected: np.ndarray,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(tiny_run), str(test_csv), "--format", "kaggle"]) == 0
    np.testing.assert_array_equal(read_submission(tmp_path / "submission.csv", 300), expected)


def test_labelled_csv_is_accepted_with_a_note(tiny_run: Path, digits: DigitData, expected: np.ndarray,
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_csv = write_kaggle_csv(tmp_path / "train.csv", digits.subset(np.arange(20)))
    assert main(["predict", str(tiny_run), f"kaggle:{train_csv}", "--format", "kaggle",
                 "--out", str(tmp_path / "s.csv")]) == 0
    assert "has a label column" in capsys.readouterr().err
    np.testing.assert_array_equal(read_submission(tmp_path / "s.csv", 20), expected[:20])


def test_submission_validation() -> None:
    assert submission_csv([3, 1], 2) == "ImageId,Label\n1,3\n2,1\n"
    with pytest.raises(DigitlabError, match="2 rows, expected 3"):
        submission_csv([3, 1], 3)
    with pytest.raises(DigitlabError, match=r"integers 0\.\.9"):
        submission_csv([3, 10], 2)
    with pytest.raises(DigitlabError, match="row 2: ImageId 3"):
        validate_submission(np.array([1, 3]), np.array([0, 0]), 2)


def test_kaggle_format_needs_one_csv(tiny_run: Path, digits: DigitData, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", digits.images[:3])
    assert main(["predict", str(tiny_run), str(tmp_path / "x.npy"), "--format", "kaggle",
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "needs exactly one readable Kaggle test.csv" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


# ---------------------------------------------------------------- csv / json output, arrays


def test_csv_to_stdout_from_npy(tiny_run: Path, digits: DigitData, expected: np.ndarray, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "flat.npy", digits.images[:10].reshape(10, 784))
    np.save(tmp_path / "scaled.npy", digits.images[10:15].astype(np.float32) / 255)  # floats in [0, 1]
    assert main(["predict", str(tiny_run), str(tmp_path / "flat.npy"), str(tmp_path / "scaled.npy")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 15
    assert rows[0]["source"] == f"{tmp_path / 'flat.npy'}#1" and rows[14]["source"].endswith("scaled.npy#5")
    np.testing.assert_array_equal([int(r["digit"]) for r in rows], expected[:15])
    first = rows[0]["top_k"].split()
    assert len(first) == 3 and first[0].startswith(f"{rows[0]['digit']}:")
    assert float(rows[0]["probability"]) == pytest.approx(float(first[0].split(":")[1]), abs=1e-4)


def test_json_from_idx(tiny_run: Path, digits: DigitData, expected: np.ndarray, tmp_path: Path) -> None:
    idx = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(idx, digits.images[:12])
    out = tmp_path / "pred.json"
    assert main(["predict", str(tiny_run), str(idx), "--format", "json", "--top-k", "5", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["digit"] for r in records] == expected[:12].tolist()
    assert all(len(r["top_k"]) == 5 for r in records)
    assert records[0]["top_k"][0] == {"digit": records[0]["digit"], "probability": records[0]["probability"]}


def test_bad_arrays_are_reported_and_the_rest_predicted(tiny_run: Path, digits: DigitData, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "good.npy", digits.images[:4])
    np.save(tmp_path / "wrong.npy", np.zeros((4, 700), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", digits.labels[:4].astype(np.uint8))
    code = main(["predict", str(tiny_run), str(tmp_path / "good.npy"), str(tmp_path / "wrong.npy"),
                 str(tmp_path / "t10k-labels-idx1-ubyte"), str(tmp_path / "missing.png")])
    captured = capsys.readouterr()
    assert code == 2
    assert len(list(csv.DictReader(io.StringIO(captured.out)))) == 4
    assert "wrong.npy: got shape [4, 700] (700 pixels per image)" in captured.err
    assert "idx1-ubyte: an IDX label file" in captured.err
    assert "missing.png: no such file" in captured.err


# ---------------------------------------------------------------- image files and folders


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for d in (0, 3, 7):
        render_digit(d).save(folder / f"digit{d}.png")
    render_digit(5).convert("RGB").save(folder / "digit5.jpg", quality=85)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("L", (50, 50), 255).save(folder / "blank.png")
    (folder / "notes.txt").write_text("not an image: skipped, not an error")
    return folder


def test_folder_with_bad_files(tiny_run: Path, image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["predict", str(tiny_run), str(image_folder), "--format", "json"])
    captured = capsys.readouterr()
    assert code == 2
    rows = json.loads(captured.out)
    names = [Path(r["source"]).name for r in rows]
    assert names == ["blank.png", "digit0.png", "digit3.png", "digit5.jpg", "digit7.png"]
    # a blank file is answered as a blank upload or JSON image is: flagged, not an error
    assert rows[0]["uncertain"] is True and rows[0]["reason"] == "too little ink"
    assert "broken.png: not a readable image" in captured.err
    assert "blank.png" not in captured.err and "notes.txt" not in captured.err
    assert "1 input(s) failed, 5 images predicted" in captured.err


def test_python_api(tiny_run: Path, image_folder: Path) -> None:
    result = predict_inputs(tiny_run, [image_folder / "digit3.png", image_folder / "blank.png"], top_k=2)
    assert result.ok and not result.errors and len(result.predictions) == 2
    p, blank = result.predictions
    assert p.source.endswith("digit3.png") and len(p.top_k) == 2 and p.top_k[0][0] == p.digit
    assert blank.uncertain and blank.reason == "too little ink"


def test_tta_proba(tiny_run: Path, digits: DigitData) -> None:
    predictor = load_predictor(tiny_run)
    probs = tta_proba(predictor, digits.images[:200])
    assert probs.shape == (200, 10)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-4)
    plain = predictor.predict_proba(digits.images[:200])
    assert np.abs(probs - plain).max() > 0.01  # the views change the answer's confidence...
    assert (probs.argmax(1) == plain.argmax(1)).mean() > 0.95  # ...but mostly not the answer


def _shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move the ink by (dx, dy) pixels, background coming in at the edges."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        images[:, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def test_tta_is_the_mean_over_its_views(tiny_run: Path, digits: DigitData) -> None:
    predictor = load_predictor(tiny_run)
    images = digits.images[:100]
    shifts = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    views = [("identity",)] + [("shift", dx, dy) for dx, dy in shifts]
    expected = np.mean([predictor.predict_proba(images)]
                       + [predictor.predict_proba(_shifted(images, dx, dy)) for dx, dy in shifts], axis=0)
    np.testing.assert_allclose(tta_proba(predictor, images, views), expected, atol=1e-5)


# (canvas size, font size, ink, paper): off-centre printed digits of different sizes and colours
PRINTED_VARIANTS = [((300, 200), 150, (10, 20, 80), "white"),
                    ((240, 320), 110, (0, 0, 0), (235, 230, 220)),
                    ((400, 260), 90, (60, 60, 60), "white")]


def _plain_resize(path: Path) -> np.ndarray:
    """The naive alternative: the whole canvas resized to 28x28, inverted when the paper is light."""
    array = np.asarray(Image.open(path).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return 255 - array if np.median(border) > 127 else array


def test_printed_digits_are_recognised(tiny_run: Path, tmp_path: Path) -> None:
    """DejaVu Sans digits 0-9 in 3 looks, as PNG files, through MNIST-style preprocessing."""
    paths, truth = [], []
    for v, (size, font_size, ink, paper) in enumerate(PRINTED_VARIANTS):
        for d in range(10):
            img = Image.new("RGB", size, paper)
            ImageDraw.Draw(img).text((20 + 13 * d, 5 + 4 * d), str(d), fill=ink,
                                     font=ImageFont.truetype(FONT, font_size))
            paths.append(tmp_path / f"v{v}-{d}.png")
            img.save(paths[-1])
            truth.append(d)
    result = predict_inputs(tiny_run, paths)
    predicted = np.array([p.digit for p in result.predictions])
    correct = int((predicted == truth).sum())
    # Measured: the session's small model (2 epochs on 3,000 images) gets 27 of 30 (misses: the
    # DejaVu 1, whose foot and flag read as a 2, and one 6); a 99.2% model gets 30 of 30.
    # Printed glyphs are not handwriting, so allow 6 misses.
    assert correct >= 24, f"predicted {predicted.tolist()} for {truth}"
    # ...and the preprocessing is what does it: a plain resize of the same canvases gets ~7 of 30.
    naive = load_predictor(tiny_run).predict_proba(np.stack([_plain_resize(p) for p in paths])).argmax(1)
    assert correct >= int((naive == truth).sum()) + 10


def test_evaluate_on_an_image_folder_scores_what_predict_answers(tiny_run: Path, digits: DigitData,
                                                                 tmp_path: Path) -> None:
    """`images:DIR` reads each file as `predict` does. It used to resize the whole canvas to 28x28,
    so a folder of scans scored near chance in `evaluate` while `predict` read the same files."""
    from digitlab.data import load_source
    from digitlab.evaluate import evaluate_run

    rng = np.random.default_rng(0)
    paths = []
    for i, (image, label) in enumerate(zip(digits.images[:40], digits.require_labels()[:40], strict=True)):
        ink = Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC)  # dark ink, scanned 4x
        paper = Image.new("L", (320, 240), 235)
        paper.paste(ink, (int(rng.integers(0, 200)), int(rng.integers(0, 120))))
        paths.append(tmp_path / "scans" / str(label) / f"{i:02d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paper.save(paths[-1])
    folder = load_source(f"images:{tmp_path / 'scans'}")
    order = sorted(range(len(paths)), key=lambda k: (int(paths[k].parent.name), paths[k].name))
    answered = [p.digit for p in predict_inputs(tiny_run, [paths[k] for k in order]).predictions]
    assert folder.labels.tolist() == [int(paths[k].parent.name) for k in order]
    scored = evaluate_run(tiny_run, folder)
    assert scored.accuracy == np.mean(np.array(answered) == folder.labels)
    assert scored.accuracy >= 0.85  # measured 0.95; the old whole-canvas resize: 0.20


@pytest.mark.slow
def test_int8_predictor_agrees_with_fp32(tiny_run, mnist_test) -> None:
    from digitlab.inference import load_predictor

    images = mnist_test.images[:2000]
    fp32 = load_predictor(tiny_run, precision="fp32").predict_proba(images).argmax(1)
    int8 = load_predictor(tiny_run, precision="int8")
    assert int8.precision == "int8"
    agreement = (int8.predict_proba(images).argmax(1) == fp32).mean()
    assert agreement >= 0.99


def test_predictions_carry_uncertain_and_reason_in_json_and_csv_not_kaggle() -> None:
    from digitlab.predict import predictions_csv, predictions_from_proba, predictions_json, submission_csv

    images = np.zeros((2, 28, 28), np.uint8)
    images[1, 4:24, 12:16] = 255  # a "1"
    probs = np.full((2, 10), 0.01, np.float32)
    probs[:, 1] = 0.91
    preds = predictions_from_proba(probs, ["blank", "one"], images=images, min_confidence=0.5)
    assert [(p.uncertain, p.reason) for p in preds] == [(True, "too little ink"), (False, None)]
    records = json.loads(predictions_json(preds))
    assert records[0]["uncertain"] is True and records[0]["reason"] == "too little ink"
    rows = list(csv.DictReader(io.StringIO(predictions_csv(preds))))
    assert (rows[0]["uncertain"], rows[0]["reason"]) == ("true", "too little ink")
    assert (rows[1]["uncertain"], rows[1]["reason"]) == ("false", "")
    assert submission_csv([p.digit for p in preds], 2) == "ImageId,Label\n1,1\n2,1\n"
