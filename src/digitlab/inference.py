"""Load a trained run (or an ensemble of runs) once and turn uint8 digits into probabilities.

Shared by evaluate, predict, report, serve and export: one place decides precision,
memory format and batching for inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    batch_size: int = 2048

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
        """(N, 10) float32 probabilities: the mean over members."""
        return self.member_proba(images).mean(axis=0)


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
                   batch_size: int = 2048, backend: str = "torch") -> Predictor:
    """A run folder (model.safetensors + model.json) or an ensemble folder (ensemble.json).

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
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    models = [prepare_model(m, dev).eval() for m in models]
    return Predictor(models, meta, dev, prec, batch_size)
