"""`digitlab data ...` end to end on small generated files: output, exit codes, error lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from digitlab.cli import main
from digitlab.data import DigitData, load_idx_dir, load_kaggle_csv, write_kaggle_csv


@pytest.fixture
def data() -> DigitData:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 3)  # 3 of each digit
    return DigitData(images, labels, "generated")


@pytest.fixture
def train_csv(tmp_path, data):
    return write_kaggle_csv(tmp_path / "train.csv", data)


@pytest.fixture
def bad_csv(tmp_path, train_csv):
    lines = train_csv.read_text().splitlines()
    cells = lines[2].split(",")
    cells[0] = "10"
    lines[2] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_info_prints_counts_and_fingerprint(train_csv, data, capsys):
    assert main(["data", "info", f"kaggle:{train_csv}"]) == 0
    out = capsys.readouterr().out
    assert f"source       kaggle:{train_csv}" in out
    assert "images       30 x 28x28 uint8" in out
    assert "labels       yes" in out
    assert f"fingerprint  {data.fingerprint}" in out
    for digit in range(10):
        assert f"  {digit}       3  10.00%" in out


def test_info_json(train_csv, data, capsys):
    assert main(["data", "info", f"kaggle:{train_csv}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 30
    assert info["class_counts"] == [3] * 10
    assert info["fingerprint"] == data.fingerprint
    assert info["source"] == f"kaggle:{train_csv}"
    assert info["pixel_mean"] == pytest.approx(data.images.mean() / 255)


def test_info_without_labels(tmp_path, data, capsys):
    path = write_kaggle_csv(tmp_path / "test.csv", data, with_labels=False)
    assert main(["data", "info", f"kaggle:{path}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_counts"] is None
    assert main(["data", "info", f"kaggle:{path}"]) == 0
    assert "labels       no" in capsys.readouterr().out


def test_show_writes_png(tmp_path, train_csv, capsys):
    out = tmp_path / "figs" / "grid.png"
    assert main(["data", "show", f"kaggle:{train_csv}", "--n", "6", "--seed", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.width > 100 and img.height > 100


def test_export_kaggle_to_idx_to_kaggle(tmp_path, train_csv, data, capsys):
    idx_dir = tmp_path / "idx"
    assert main(["data", "export", f"kaggle:{train_csv}", "--format", "idx", "--out", str(idx_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {idx_dir / 'train-images-idx3-ubyte.gz'}",
        f"wrote {idx_dir / 'train-labels-idx1-ubyte.gz'}",
    ]
    assert load_idx_dir(idx_dir).fingerprint == data.fingerprint

    back = tmp_path / "back.csv"
    assert main(["data", "export", f"idx:{idx_dir}", "--format", "kaggle", "--out", str(back)]) == 0
    assert back.read_bytes() == train_csv.read_bytes()
    assert load_kaggle_csv(back).fingerprint == data.fingerprint


def test_export_out_paths_a_user_gets_wrong(tmp_path, train_csv, capsys):
    """A CSV goes into a folder that does not exist yet (made, as `data show` does); a folder or a
    file where the other kind is needed is one line saying which is expected."""
    nested = tmp_path / "new" / "deeper" / "train.csv"
    assert main(["data", "export", f"kaggle:{train_csv}", "--format", "kaggle", "--out", str(nested)]) == 0
    assert nested.read_bytes() == train_csv.read_bytes()
    capsys.readouterr()
    assert main(["data", "export", f"kaggle:{train_csv}", "--format", "idx", "--out", str(nested)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"digitlab: error: --out {nested}: a file; --format idx writes its files into a folder")
    assert main(["data", "export", f"kaggle:{train_csv}", "--format", "kaggle", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"digitlab: error: --out {tmp_path}: a folder; --format kaggle writes one CSV file "
        f"(e.g. {tmp_path / 'train.csv'})")


def test_export_test_split_and_no_labels(tmp_path, train_csv, data, capsys):
    idx_dir = tmp_path / "idx"
    assert main(["data", "export", f"kaggle:{train_csv}", "--format", "idx", "--split", "test",
                 "--out", str(idx_dir)]) == 0
    assert load_idx_dir(idx_dir, "test").fingerprint == data.fingerprint
    pixels_only = tmp_path / "test.csv"
    assert main(["data", "export", f"idx:{idx_dir}:test", "--format", "kaggle", "--no-labels",
                 "--out", str(pixels_only)]) == 0
    loaded = load_kaggle_csv(pixels_only)
    assert loaded.labels is None and np.array_equal(loaded.images, data.images)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["data", "info", "kaggle:{bad}"], "{bad}: line 3: label 10 outside 0..9"),
        (["data", "info", "kaggle:{tmp}/nope.csv"], "{tmp}/nope.csv: no such file"),
        (["data", "info", "train.csv"], "unknown data source 'train.csv'; expected one of: mnist, "),
        (["data", "export", "kaggle:{bad}", "--format", "idx", "--out", "{tmp}/o"], "{bad}: line 3: "),
        (["data", "show", "idx:{tmp}", "--out", "{tmp}/x.png"], "{tmp}: no train-images-idx3-ubyte"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, bad_csv, capsys, argv, expected):
    def fill(text: str) -> str:
        return text.format(bad=bad_csv, tmp=tmp_path)

    assert main([fill(a) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("digitlab: error: " + fill(expected))
    assert "Traceback" not in captured.err


def test_help_mentions_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: digitlab" in out
    assert "data" in out and "--verbose" in out


def test_data_export_help_mentions_its_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["data", "export", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--format", "{kaggle,idx}", "--out", "--split", "--no-labels", "kaggle:PATH", "idx:DIR"):
        assert flag in out, flag


def test_data_download_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["data", "download", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for text in ("--dir", "--mirror", "DIGITLAB_MNIST_MIRRORS", "repeatable"):
        assert text in out, text


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["data", "export", "kaggle:x.csv", "--format", "parquet", "--out", "y"])
    assert exited.value.code == 2
    assert "invalid choice: 'parquet'" in capsys.readouterr().err


def test_subprocess_bad_file_single_line_stderr(tmp_path, bad_csv):
    env = {**os.environ, "DIGITLAB_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "digitlab", "data", "info", f"kaggle:{bad_csv}"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"digitlab: error: {bad_csv}: line 3: label 10 outside 0..9\n"


@pytest.mark.parametrize(("argv", "expected"), [
    (["data", "show", "--n", "401"], "argument --n: must be at most 400, got 401"),
    (["augment-preview", "--copies", "100000"], "argument --copies: must be at most 16, got 100000"),
    (["augment-preview", "--n", "33"], "argument --n: must be at most 32, got 33"),
    (["augment-preview", "--copies", "0"], "argument --copies: must be at least 1, got 0"),
])
def test_figure_counts_are_bounded(tmp_path, argv, expected, capsys):
    """One matplotlib panel per digit: 100,000 copies used to run for minutes before any output."""
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "x.png")])
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
