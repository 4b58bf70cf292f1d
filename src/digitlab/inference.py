"""Load a trained run (or an ensemble of runs) once and turn uint8 digits into probabilities.

Shared by evaluate, predict, report, serve and export: one place decides precision,
memory format and batching for inference.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitlab.calibration import apply_run_calibration, calibration_meta
from digitlab.checkpoint import MODEL_META, load_model
from digitlab.errors import DigitlabError
from digitlab.train import predict_logits, prepare_model, resolve_device, resolve_precision

ENSEMBLE_FILE = "ensemble.json"


@dataclass
class Predictor:
    """One or more models whose softmax probabilities are averaged."""

    models: list[torch.nn.Module]
    meta: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    batch_size: int = 256  # on 2 CPU cores 128-256 beat 1024+ (caches); see benchmarks/RESULTS.md

    @property
    def members(self) -> int:
        return len(self.models)

    def member_proba(self, images: np.ndarray) -> np.ndarray:
        """(M, N, 10) float32 probabilities of each member for uint8 images (N, 28, 28)."""
        images = _check_images(images)
        x = torch.from_numpy(images)
        out = [
            torch.softmax(predict_logits(m, x, self.batch_size, self.precision, self.device), dim=1).numpy()
            for m in self.models
        ]
        return np.stack(out)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 probabilities: the mean over members, temperature-scaled if calibrated."""
        return apply_run_calibration(self.member_proba(images).mean(axis=0), self.meta)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 2 and images.shape[1] == 784:
        images = images.reshape(-1, 28, 28)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DigitlabError(f"expected images of shape (N, 28, 28) or (N, 784), got {images.shape}")
    if images.dtype != np.uint8:
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
            raise DigitlabError("pixel values must be finite and within 0..255")
        images = np.rint(images).astype(np.uint8)
    return images


def is_ensemble(path: Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def ensemble_members(path: Path) -> list[Path]:
    manifest = Path(path) / ENSEMBLE_FILE
    try:
        names = json.loads(manifest.read_text())["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DigitlabError(f"{manifest}: corrupt ensemble manifest ({exc})") from None
    members = [Path(path) / name for name in names]
    if not members:
        raise DigitlabError(f"{manifest}: lists no members")
    return members


def load_predictor(path: str | Path, precision: str = "auto", device: str = "cpu",
                   batch_size: int = 256, backend: str = "torch", calibrated: bool = True) -> Predictor:
    """A run folder (model.safetensors + model.json) or an ensemble folder (ensemble.json).

    `calibrated`: apply the folder's calibration.json temperature (if any) to the probabilities.

    backend="onnx" returns an ONNX Runtime `digitlab.export.OnnxPredictor` (same methods; fp32,
    CPU) from RUN_DIR/model.onnx if fresh, else exported on the fly; `path` may be an .onnx file.
    """
    if backend == "onnx":
        from digitlab.export import load_onnx_predictor

        return load_onnx_predictor(path, batch_size=batch_size)  # type: ignore[return-value]
    if backend != "torch":
        raise DigitlabError(f"unknown backend {backend!r}; choose torch or onnx")
    path = Path(path)
    if not path.is_dir():
        raise DigitlabError(f"{path}: no such run folder")
    if is_ensemble(path):
        loaded = [load_model(member) for member in ensemble_members(path)]
        meta = json.loads((path / ENSEMBLE_FILE).read_text())
        meta.setdefault("preset", loaded[0][1].get("preset"))
        meta["member_meta"] = [m for _, m in loaded]
        models = [m for m, _ in loaded]
    elif (path / MODEL_META).is_file():
        model, meta = load_model(path)
        models = [model]
    else:
        raise DigitlabError(f"{path}: neither a run folder (model.json) nor an ensemble ({ENSEMBLE_FILE})")
    if calibrated:
        meta.update(calibration_meta(path))
    dev = resolve_device(device)
    if precision == "int8":
        if dev.type != "cpu":
            raise DigitlabError("int8 inference runs on the CPU only")
        calibration = calibration_images(meta)
        models = [quantize_int8(prepare_model(m, dev).eval(), calibration) for m in models]
        return Predictor(models, meta, dev, "int8", batch_size)
    prec = resolve_precision(precision, dev)
    models = [prepare_model(m, dev).eval() for m in models]
    return Predictor(models, meta, dev, prec, batch_size)


CALIBRATION_IMAGES = 2000


def calibration_images(meta: dict[str, Any], count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Training images to calibrate int8 ranges: the run's own source if readable, else MNIST's."""
    from digitlab.data import load_source

    sources = [meta.get("data", {}).get("train_source"), "mnist:train"]
    if "member_meta" in meta:
        sources.insert(0, meta["member_meta"][0].get("data", {}).get("train_source"))
    for source in filter(None, sources):
        try:
            images = load_source(source).images
        except DigitlabError:
            continue
        # an even spread over the data set, never the evaluation data
        return images[np.linspace(0, len(images) - 1, min(count, len(images))).astype(int)]
    raise DigitlabError("int8 calibration needs training images: neither the run's source nor mnist is readable")


def quantize_int8(model: torch.nn.Module, calibration: np.ndarray) -> torch.nn.Module:
    """Static post-training int8 quantization (torch.ao FX, x86 backend: VNNI kernels).

    About 2x the bf16 throughput on AVX512-VNNI CPUs; activation ranges come from
    `calibration` (uint8 training images).
    """
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              (torch.zeros(1, 1, 28, 28),))
        predict_logits(prepared, torch.from_numpy(calibration), 500, "fp32", torch.device("cpu"))
        return convert_fx(prepared)
