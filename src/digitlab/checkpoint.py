"""Weights in safetensors, metadata in JSON; every write is atomic (temp file + rename).

- `model.safetensors` + `model.json`: the trained model and all needed to rebuild it
  (preset, model arguments, normalisation, metrics, data fingerprint, versions, sha256).
- `checkpoint.safetensors`: the resumable training state (weights, optimizer, scheduler,
  RNG states, position), one file whose JSON header carries the non-tensor parts and a
  checksum, so a crash can never leave a half-written pair behind.
Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from digitlab.errors import DigitlabError, missing
from digitlab.rundir import (
    MODEL_FILE,
    MODEL_META,
    TRAIN_HASHES_FILE,
    atomic_write_bytes,
    atomic_write_json,
    unfinished_hint,
)

FORMAT_VERSION = 1
CLASS_NAMES = [str(d) for d in range(10)]
# Inputs are pixel / 255 in [0, 1], background 0, ink 1 (MNIST polarity); no mean/std shift.
INPUT_NORMALISATION = {"scale": 1 / 255, "mean": 0.0, "std": 1.0, "polarity": "light-on-dark"}


def versions() -> dict[str, str]:
    import numpy

    from digitlab import __version__

    return {
        "digitlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


# ---------------------------------------------------------------- the trained model


def save_model(run_dir: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> Path:
    """Write model.safetensors and its sidecar; `metadata` must hold at least `model` and `model_args`."""
    blob = save(_contiguous(model.state_dict()))
    meta = {
        "format_version": FORMAT_VERSION,
        "class_names": CLASS_NAMES,
        "input": INPUT_NORMALISATION,
        "versions": versions(),
        **metadata,
        "weights_sha256": _sha256(blob),
    }
    atomic_write_bytes(run_dir / MODEL_FILE, blob)
    atomic_write_json(run_dir / MODEL_META, meta)
    return run_dir / MODEL_FILE


def read_model_meta(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_META
    if not path.is_file():
        raise DigitlabError(f"{run_dir}: no {MODEL_META}; expected a run folder written by `digitlab train`"
                            f"{unfinished_hint(Path(run_dir))}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DigitlabError(f"{path}: corrupt JSON (line {exc.lineno}: {exc.msg})") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DigitlabError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    _check_model_meta(meta, path)
    return meta


def _check_model_meta(meta: Any, path: Path) -> None:
    """Refuse a model.json whose structure cannot rebuild a model (every reader goes through here)."""
    from digitlab.models import model_parameters

    if not isinstance(meta, dict):
        raise DigitlabError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    name = meta.get("model")
    if not isinstance(name, str):
        raise DigitlabError(f"{path}: no model name (key 'model' is {name!r}, expected a preset name)")
    args = meta.get("model_args", {})
    if not isinstance(args, dict):
        raise DigitlabError(f"{path}: model_args must be an object of keyword arguments, got {type(args).__name__}")
    try:
        accepted = model_parameters(name)
    except DigitlabError as exc:  # an unknown model
        raise DigitlabError(f"{path}: {exc}") from None
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise DigitlabError(
            f"{path}: model_args {', '.join(map(repr, unknown))} not accepted by model {name!r} "
            f"(it takes: {', '.join(accepted) or 'no arguments'})"
        )
    _check_input_meta(meta, path)


def _check_input_meta(meta: dict[str, Any], path: Path) -> None:
    """The blocks consumers read besides the model: torch always feeds pixel / 255, so an `input`
    block saying otherwise would make the ONNX export (which reads it) disagree with torch."""
    norm = meta.get("input", INPUT_NORMALISATION)
    if not isinstance(norm, dict) or any(
            not isinstance(norm.get(k), int | float) or abs(norm[k] - v) > 1e-12
            for k, v in INPUT_NORMALISATION.items() if k != "polarity"):
        raise DigitlabError(f"{path}: input must be {INPUT_NORMALISATION} (what every digitlab model is fed), "
                            f"got {norm!r}")
    names = meta.get("class_names", CLASS_NAMES)
    if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, str) for n in names)):
        raise DigitlabError(f"{path}: class_names must be a list of 10 names, got {names!r}")
    for key in ("data", "metrics"):
        if not isinstance(meta.get(key, {}), dict):
            raise DigitlabError(f"{path}: {key} must be an object, got {type(meta[key]).__name__}")


def load_model(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a run folder from its two files; checksum verified. Returns (model, meta)."""
    from digitlab.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise missing(run_dir, "a run folder", folder=True)
    meta = read_model_meta(run_dir)
    weights = run_dir / MODEL_FILE
    if not weights.is_file():
        raise DigitlabError(f"{weights}: missing")
    blob = weights.read_bytes()
    if _sha256(blob) != meta.get("weights_sha256"):
        raise DigitlabError(f"{weights}: checksum does not match {MODEL_META} (corrupt or replaced file)")
    try:
        model = create_model(meta["model"], **meta.get("model_args", {}))
    except (TypeError, DigitlabError) as exc:  # model_args that are not a mapping, or that do not build the model
        raise DigitlabError(f"{run_dir / MODEL_META}: {exc}") from None
    try:
        model.load_state_dict(load(blob))
    except (SafetensorError, RuntimeError) as exc:  # torch lists every mismatched tensor: the first line says enough
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise DigitlabError(f"{weights}: weights do not fit model {meta['model']!r} ({first})") from None
    model.eval()
    return model, meta


# ---------------------------------------------------------------- what the model trained on


def write_train_hashes(run_dir: Path, hashes: np.ndarray) -> Path:
    """Store the set of training-image hashes (sorted, unique uint64; 8 bytes an image)."""
    buffer = io.BytesIO()
    np.save(buffer, np.unique(np.asarray(hashes, dtype=np.uint64)), allow_pickle=False)
    atomic_write_bytes(Path(run_dir) / TRAIN_HASHES_FILE, buffer.getvalue())
    return Path(run_dir) / TRAIN_HASHES_FILE


def read_train_hashes(run_dir: Path) -> np.ndarray | None:
    """The run's training-image hashes, or None for a run written before they were recorded."""
    path = Path(run_dir) / TRAIN_HASHES_FILE
    if not path.is_file():
        return None
    try:
        hashes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DigitlabError(f"{path}: unreadable ({exc}); expected a uint64 .npy array") from None
    if hashes.dtype != np.uint64 or hashes.ndim != 1:
        raise DigitlabError(f"{path}: expected a 1-D uint64 array, got {hashes.dtype} {hashes.shape}")
    return hashes


# ---------------------------------------------------------------- the resumable state


def _flatten_optimizer(state: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        plain_state[str(index)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(slots) for i, slots in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    rng: dict[str, torch.Tensor],
    info: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Everything needed to continue training exactly where it stopped, in one atomic file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict(), "optim")
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    tensors.update({f"extra.{k}": v for k, v in (extra_tensors or {}).items()})
    tensors = _contiguous(tensors)
    payload_sha = _sha256(save(tensors))
    header = {
        "format_version": FORMAT_VERSION,
        "info": info,
        "optimizer": opt_plain,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "payload_sha256": payload_sha,
    }
    atomic_write_bytes(path, save(tensors, metadata={"digitlab": json.dumps(header)}))


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a resumable checkpoint; returns (tensors, header)."""
    if not path.is_file():
        raise DigitlabError(f"{path}: no checkpoint to resume from")
    blob = path.read_bytes()
    try:
        from safetensors import safe_open

        tensors = load(blob)
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["digitlab"])
    except (SafetensorError, KeyError, json.JSONDecodeError, ValueError, OSError) as exc:
        raise DigitlabError(f"{path}: corrupt checkpoint ({exc.__class__.__name__}: {exc})") from None
    if _sha256(save(tensors)) != header.get("payload_sha256"):
        raise DigitlabError(f"{path}: checksum mismatch (corrupt checkpoint)")
    return tensors, header


def restore_state(
    tensors: dict[str, torch.Tensor],
    header: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
) -> dict[str, torch.Tensor]:
    """Load model/optimizer/scheduler in place; returns the RNG tensors."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, header["optimizer"], "optim"))
    if scheduler is not None and header.get("scheduler") is not None:
        scheduler.load_state_dict(header["scheduler"])
    return {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}


def extra_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}


def read_state_header(path: Path) -> dict[str, Any]:
    """The JSON header of a resumable checkpoint (position, history, data, config) without
    reading its tensors or verifying them: for listings, not for resuming."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["digitlab"])
    except (SafetensorError, KeyError, json.JSONDecodeError, ValueError, OSError) as exc:
        raise DigitlabError(f"{path}: corrupt checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise DigitlabError(f"{path}: corrupt checkpoint (header is not a JSON object)")
    return header
