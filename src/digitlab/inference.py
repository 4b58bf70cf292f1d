"""Load a trained run (or an ensemble of runs) once and turn uint8 digits into probabilities.

Shared by evaluate, predict, report, serve and export: one place decides precision,
memory format and batching for inference.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from digitlab.augment import rotate, translate
from digitlab.calibration import apply_run_calibration, calibration_meta
from digitlab.checkpoint import load_model
from digitlab.errors import DigitlabError
from digitlab.pixels import as_uint8_images
from digitlab.rundir import ENSEMBLE_FILE, ensemble_members, is_ensemble, require_model_folder
from digitlab.runtime import predict_logits, prepare_model, resolve_device, resolve_precision


class ProbabilityModel(Protocol):
    """What evaluate, predict, report and serve need of a model: `Predictor` (torch) or
    `digitlab.export.OnnxPredictor` (ONNX Runtime)."""

    meta: dict[str, Any]
    precision: str
    backend: str
    batch_size: int

    @property
    def members(self) -> int: ...

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class Predictor:
    """One or more models whose softmax probabilities are averaged."""

    models: list[torch.nn.Module]
    meta: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    batch_size: int = 256  # on 2 CPU cores 128-256 beat 1024+ (caches); see benchmarks/RESULTS.md
    backend: str = "torch"

    @property
    def members(self) -> int:
        return len(self.models)

    @property
    def weights(self) -> np.ndarray | None:
        """Per-member weights of the average (ensemble.json `weights`), or None for equal weights."""
        return member_weights(self.meta, self.members)

    def member_proba(self, images: np.ndarray) -> np.ndarray:
        """(M, N, 10) float32 probabilities of each member for uint8 images (N, 28, 28)."""
        images = as_uint8_images(images, "images")
        x = torch.from_numpy(images)
        out = [
            torch.softmax(predict_logits(m, x, self.batch_size, self.precision, self.device), dim=1).cpu().numpy()
            for m in self.models
        ]
        return np.stack(out)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 probabilities: the (weighted) mean over members, temperature-scaled if calibrated."""
        weights = self.weights
        probs = self.member_proba(images)
        mean = probs.mean(axis=0) if weights is None else np.tensordot(weights.astype(np.float32), probs, axes=1)
        return apply_run_calibration(mean, self.meta)

def member_weights(meta: dict[str, Any], members: int) -> np.ndarray | None:
    """The ensemble's member weights (summing to 1), checked against the number of members."""
    weights = meta.get("weights")
    if weights is None:
        return None
    bad = DigitlabError(f"{ENSEMBLE_FILE}: weights {weights!r} must be {members} non-negative numbers")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):  # strings, objects, ragged lists
        raise bad from None
    if w.shape != (members,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise bad
    return w / w.sum()


# ---------------------------------------------------------------- test-time augmentation

# Small views a writer's hand could also have produced: one-pixel shifts and +-8 degree tilts.
# ("shift", dx, dy) in pixels; ("rotate", degrees).
TTA_VIEWS: tuple[tuple, ...] = (
    ("identity",),
    ("shift", 1, 0), ("shift", -1, 0), ("shift", 0, 1), ("shift", 0, -1),
    ("rotate", 8.0), ("rotate", -8.0),
)


def _view(x: torch.Tensor, view: tuple) -> torch.Tensor:
    """x: (N, 1, 28, 28) float in [0, 1]."""
    if view[0] == "identity":
        return x
    if view[0] == "shift":
        return translate(x, float(view[1]), float(view[2]))
    if view[0] == "rotate":
        return rotate(x, float(view[1]), fill="constant")
    raise ValueError(f"unknown TTA view {view!r}")


def tta_proba(predictor: ProbabilityModel, images: np.ndarray, views: Sequence[tuple] = TTA_VIEWS) -> np.ndarray:
    """(N, 10) probabilities averaged over `views` of uint8 images (N, 28, 28)."""
    images = np.asarray(images)
    if len(images) == 0:
        return np.empty((0, 10), dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).float().div_(255).unsqueeze(1)
    total = np.zeros((len(images), 10), dtype=np.float64)
    for view in views:
        # back to uint8: the Predictor's input contract; rounding costs < 0.5/255 per pixel
        shifted = (_view(x, view).clamp_(0, 1) * 255).round_().to(torch.uint8).squeeze(1).numpy()
        total += predictor.predict_proba(shifted)
    return (total / len(views)).astype(np.float32)


def predict_proba(predictor: ProbabilityModel, images: np.ndarray, tta: bool = False) -> np.ndarray:
    return tta_proba(predictor, images) if tta else predictor.predict_proba(images)


def load_predictor(path: str | Path, precision: str = "auto", device: str = "cpu",
                   batch_size: int = 256, calibrated: bool = True) -> Predictor:
    """A run folder (model.safetensors + model.json) or an ensemble folder (ensemble.json), in torch.

    `calibrated`: apply the folder's calibration.json temperature (if any) to the probabilities.
    (ONNX Runtime: `digitlab.export.open_predictor(path, backend="onnx")`.)
    """
    path = require_model_folder(path)
    if is_ensemble(path):
        loaded = [load_model(member) for member in ensemble_members(path)]
        meta = json.loads((path / ENSEMBLE_FILE).read_text())
        meta.setdefault("preset", loaded[0][1].get("preset"))
        meta["member_meta"] = [m for _, m in loaded]
        models = [m for m, _ in loaded]
    else:
        model, meta = load_model(path)
        models = [model]
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
