"""ONNX export: a valid file with its preprocessing in the metadata, and the same answers as torch.

Exports go into copies of the session's tiny run so the shared folder is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from digitlab.checkpoint import load_model
from digitlab.data import DigitData
from digitlab.errors import DigitlabError
from digitlab.export import (
    ONNX_FILE,
    OnnxPredictor,
    export_onnx,
    load_onnx_predictor,
    open_predictor,
    parity_check,
    read_onnx_metadata,
)
from digitlab.inference import load_predictor


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, target)
    return target


@pytest.fixture(scope="module")
def exported(run_copy: Path) -> Path:
    return export_onnx(run_copy)


def test_export_writes_a_checked_model(exported: Path, run_copy: Path) -> None:
    assert exported == run_copy / ONNX_FILE
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_metadata_carries_the_preprocessing(exported: Path, run_copy: Path) -> None:
    meta = json.loads((run_copy / "model.json").read_text())
    props = read_onnx_metadata(exported)
    assert float(props["input_scale"]) == pytest.approx(1 / 255, rel=1e-12)
    assert props["input_polarity"] == "light-on-dark"
    assert json.loads(props["input_shape"]) == ["batch", 1, 28, 28]
    assert props["input_layout"] == "NCHW"
    assert json.loads(props["class_names"]) == [str(d) for d in range(10)]
    assert props["preset"] == "quick" and props["model"] == "seed2017"
    assert props["fingerprint"] == meta["weights_sha256"][:16]
    assert props["train_fingerprint"] == meta["data"]["train_fingerprint"]


def test_onnx_runtime_matches_torch_on_1000_mnist_images(exported: Path, run_copy: Path,
                                                         mnist_test: DigitData) -> None:
    model, _ = load_model(run_copy)  # fp32, contiguous, eval
    x = torch.from_numpy(mnist_test.images[:1000]).unsqueeze(1).float() / 255  # (1000, 1, 28, 28)
    with torch.inference_mode():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    assert got.shape == (1000, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # the batch axis is dynamic: one image and an odd count work as well
    for n in (1, 7):
        assert session.run(["logits"], {"input": x[:n].numpy()})[0].shape == (n, 10)


def test_parity_check_reports_and_refuses(exported: Path, run_copy: Path, mnist_test: DigitData) -> None:
    report = parity_check(run_copy, exported, mnist_test.images[:200])
    assert report["images"] == 200 and report["max_abs_diff"] <= 1e-4 and report["agreement"] == 1.0
    with pytest.raises(DigitlabError, match="differs from torch"):
        parity_check(run_copy, exported, mnist_test.images[:200], tolerance=-1.0)


def test_onnx_predictor_matches_the_torch_predictor(run_copy: Path, exported: Path,
                                                    mnist_test: DigitData) -> None:
    images = mnist_test.images[:500]
    torch_probs = load_predictor(run_copy, precision="fp32").predict_proba(images)
    onnx_predictor = open_predictor(run_copy, backend="onnx", batch_size=128)
    assert isinstance(onnx_predictor, OnnxPredictor)
    assert onnx_predictor.meta["preset"] == "quick" and onnx_predictor.precision == "fp32"
    np.testing.assert_allclose(onnx_predictor.predict_proba(images), torch_probs, atol=1e-5)
    assert onnx_predictor.predict_proba(np.zeros((0, 28, 28), np.uint8)).shape == (0, 10)


def test_load_from_an_onnx_file_alone(exported: Path, tmp_path: Path, mnist_test: DigitData) -> None:
    alone = tmp_path / "digits.onnx"
    shutil.copy(exported, alone)
    predictor = load_onnx_predictor(alone)
    assert predictor.meta["preset"] == "quick"
    assert predictor.meta["input"]["scale"] == pytest.approx(1 / 255)
    assert (predictor.predict_proba(mnist_test.images[:100]).argmax(1) == mnist_test.labels[:100]).mean() > 0.85


def test_fresh_model_onnx_is_used_and_stale_one_ignored(tiny_run: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / ONNX_FILE).write_bytes(b"not an onnx model")
    weights_time = (run / "model.safetensors").stat().st_mtime
    os.utime(run / ONNX_FILE, (weights_time - 60, weights_time - 60))  # older than the weights: stale
    with caplog.at_level("WARNING", logger="digitlab.export"):
        predictor = open_predictor(run, backend="onnx")  # exported in memory instead
    assert "is older than the run's weights" in caplog.text  # retrained into the same folder: said, not silent
    assert predictor.predict_proba(np.zeros((1, 28, 28), np.uint8)).shape == (1, 10)
    assert (run / ONNX_FILE).read_bytes() == b"not an onnx model"  # nothing written into the run
    os.utime(run / ONNX_FILE, (weights_time + 60, weights_time + 60))  # newer, but not this run's export
    caplog.clear()
    with caplog.at_level("WARNING", logger="digitlab.export"):
        predictor = open_predictor(run, backend="onnx")  # not a readable export: exported again
    assert "not a readable ONNX model" in caplog.text
    assert predictor.predict_proba(np.zeros((1, 28, 28), np.uint8)).shape == (1, 10)
    assert (run / ONNX_FILE).read_bytes() == b"not an onnx model"
    caplog.clear()
    with caplog.at_level("WARNING", logger="digitlab.export"):
        open_predictor(tiny_run, backend="onnx")  # no model.onnx at all: nothing to warn about
    assert caplog.text == ""


def test_ensemble_exports_its_mean_probabilities(tiny_run: Path, tmp_path: Path, mnist_test: DigitData) -> None:
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    shutil.copytree(tiny_run, ensemble / "a")
    shutil.copytree(tiny_run, ensemble / "b")
    # a second member with different weights: perturb one bias and re-save through the checkpoint API
    from digitlab.checkpoint import save_model

    model, meta = load_model(ensemble / "b")
    with torch.no_grad():
        model.classifier[-1].bias.add_(torch.linspace(-1, 1, 10))
    save_model(ensemble / "b", model, {k: v for k, v in meta.items() if k not in ("weights_sha256",)})
    (ensemble / "ensemble.json").write_text(json.dumps({"members": ["a", "b"]}))
    out = export_onnx(ensemble, tmp_path / "ens.onnx")
    images = mnist_test.images[:300]
    expected = load_predictor(ensemble, precision="fp32").predict_proba(images)
    got = load_onnx_predictor(out).predict_proba(images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert read_onnx_metadata(out)["model"] == "ensemble"


def test_errors() -> None:
    with pytest.raises(DigitlabError, match="unknown backend 'tensorflow'"):
        open_predictor(".", backend="tensorflow")
    with pytest.raises(DigitlabError, match=r"no such run folder or \.onnx file"):
        load_onnx_predictor("/nonexistent/run")


def test_export_cli(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from digitlab.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", str(run_copy), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "parity: max |logit difference|" in printed and "1000 MNIST test images" in printed
    onnx.checker.check_model(onnx.load(str(out)))
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder (expected a run or ensemble folder)" in capsys.readouterr().err


def test_predict_cli_with_the_onnx_backend(tiny_run: Path, tmp_path: Path, mnist_test: DigitData,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from digitlab.cli import main

    images = tmp_path / "digits.npy"
    np.save(images, mnist_test.images[:20])
    outputs = {}
    for backend in ("torch", "onnx"):
        assert main(["predict", str(tiny_run), str(images), "--format", "json", "--backend", backend]) == 0
        outputs[backend] = json.loads(capsys.readouterr().out)
    assert [p["digit"] for p in outputs["onnx"]] == [p["digit"] for p in outputs["torch"]]
    assert not (tiny_run / ONNX_FILE).exists()  # exported in memory, the shared run folder untouched
