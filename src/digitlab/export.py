"""ONNX export of a trained run (or ensemble) and an ONNX Runtime predictor with the torch API.

The graph takes `(N, 1, 28, 28)` float pixels/255 and returns `(N, 10)` logits; the
preprocessing constants travel in the model's metadata_props so the file stands alone.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from digitlab.checkpoint import CLASS_NAMES, INPUT_NORMALISATION, atomic_write_bytes
from digitlab.errors import DigitlabError
from digitlab.rundir import ENSEMBLE_FILE, MODEL_FILE, MODEL_META, ONNX_FILE, is_ensemble, require_model_folder

if TYPE_CHECKING:
    from digitlab.inference import ProbabilityModel

log = logging.getLogger(__name__)

OPSET = 17  # supported by every onnxruntime >= 1.14; nothing in these nets needs newer ops
INPUT_NAME, OUTPUT_NAME = "input", "logits"
INPUT_SHAPE = ["batch", 1, 28, 28]  # NCHW; the batch axis is dynamic
METADATA_PREFIX = "digitlab."


class _EnsembleLogits(nn.Module):
    """log(mean softmax) over members: softmax of it gives back the ensemble's mean probabilities."""

    weights: torch.Tensor

    def __init__(self, members: list[nn.Module], weights: Any = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.full((len(members),), 1 / len(members)) if weights is None else torch.as_tensor(weights)
        self.register_buffer("weights", w.float().reshape(-1, 1, 1))  # (M, 1, 1): ensemble.json weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = (torch.stack([torch.softmax(m(x), dim=1) for m in self.members]) * self.weights).sum(0)  # (B, 10)
        return torch.log(probs.clamp_min(1e-30))


def weights_digest(meta: dict[str, Any]) -> str:
    """sha256 of the weights: a single run's `weights_sha256`, or a hash over an ensemble's members."""
    if "weights_sha256" in meta:
        return str(meta["weights_sha256"])
    members = [m.get("weights_sha256", "") for m in meta.get("member_meta", [])]
    if not members:
        return ""
    import hashlib

    return hashlib.sha256("".join(members).encode()).hexdigest()


def model_fingerprint(meta: dict[str, Any]) -> str:
    """Short id of the weights: the first 16 hex digits of `weights_digest`."""
    return weights_digest(meta)[:16]


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """metadata_props for the exported file: everything a consumer needs to feed it correctly."""
    norm = meta.get("input", INPUT_NORMALISATION)
    props = {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "output": "logits (apply softmax for probabilities)",
        "input_shape": json.dumps(INPUT_SHAPE),
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_scale": repr(float(norm.get("scale", 1 / 255))),
        "input_mean": repr(float(norm.get("mean", 0.0))),
        "input_std": repr(float(norm.get("std", 1.0))),
        "input_polarity": str(norm.get("polarity", "light-on-dark")),
        "preprocessing": "x = (pixel_uint8 * scale - mean) / std; white ink on black as in MNIST",
        "class_names": json.dumps(meta.get("class_names", CLASS_NAMES)),
        "preset": str(meta.get("preset", "")),
        "model": str(meta.get("model", "ensemble" if "member_meta" in meta else "")),
        "fingerprint": model_fingerprint(meta),
        # checked against model.json when a run folder is loaded: another run's file is never served
        "weights_sha256": weights_digest(meta),
        "train_fingerprint": str(meta.get("data", {}).get("train_fingerprint", "")),
        "parameters": str(meta.get("parameters", "")),
        "digitlab_version": str(meta.get("versions", {}).get("digitlab", "")),
    }
    return {METADATA_PREFIX + k: v for k, v in props.items()}


def _load_torch(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The fp32 torch module of a run or ensemble folder, on CPU, in eval mode, plus its meta."""
    from digitlab.inference import load_predictor

    predictor = load_predictor(run_dir, precision="fp32", device="cpu")
    models = [m.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]  # stubs lack it
              for m in predictor.models]
    module = models[0] if len(models) == 1 else _EnsembleLogits(models, predictor.weights).eval()
    return module, predictor.meta


def export_onnx_bytes(run_dir: str | Path) -> bytes:
    """Serialized, checked ONNX model of a run folder (or ensemble), metadata included."""
    run_dir = Path(run_dir)
    module, meta = _load_torch(run_dir)
    return module_to_onnx(module, meta, f"digitlab {meta.get('preset', '')} model exported from {run_dir.name}")


def module_to_onnx(module: nn.Module, meta: dict[str, Any] | None = None, doc: str = "") -> bytes:
    """A float32 eval-mode module `(N, 1, 28, 28) -> (N, 10)` as a checked ONNX model."""
    import onnx

    buffer = io.BytesIO()
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which takes ~10x
        # longer here and gives the same graph for these plain conv nets.
        warnings.simplefilter("ignore")
        # typed as Any: torch's stubs list neither a file object (which export accepts) nor every
        # version's keywords
        export: Any = torch.onnx.export
        export(
            module, (example,), buffer, **_torchscript_exporter(), opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, onnx_metadata(meta or {}))
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _torchscript_exporter() -> dict[str, bool]:
    """`dynamo=False` where torch has the flag (2.5+; its default became True in 2.9); torch 2.4
    has only the TorchScript exporter and refuses the keyword."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def export_onnx(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/model.onnx (or `out`); returns the path written."""
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / ONNX_FILE
    if target.is_dir():
        raise DigitlabError(f"{target}: is a directory; give a file name such as {target / ONNX_FILE}")
    blob = export_onnx_bytes(run_dir)
    atomic_write_bytes(target, blob)
    log.info("wrote %s (%d bytes)", target, len(blob))
    return target


def parity_check(run_dir: str | Path, onnx_path: str | Path, images: np.ndarray | None = None,
                 tolerance: float = 1e-4) -> dict[str, Any]:
    """Compare ONNX Runtime with fp32 torch on `images` (default: the first 1,000 MNIST test digits).

    Raises DigitlabError when the largest logit difference exceeds `tolerance`.
    """
    source = "given"
    if images is None:
        from digitlab.data import load_mnist

        images, source = load_mnist("test").images[:1000], "MNIST test"
    module, _ = _load_torch(Path(run_dir))
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
    with torch.inference_mode():
        expected = module(x).numpy()
    got = onnx_session(str(onnx_path)).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(expected - got).max()) if len(x) else 0.0
    report = {"images": len(x), "source": source, "max_abs_diff": diff,
              "agreement": float((expected.argmax(1) == got.argmax(1)).mean()) if len(x) else 1.0}
    if not diff <= tolerance:
        raise DigitlabError(f"{onnx_path}: ONNX Runtime differs from torch by {diff:.2e} (> {tolerance:g})")
    return report


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The digitlab.* metadata_props of an exported file, prefix stripped."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


# ---------------------------------------------------------------- inference with ONNX Runtime


@dataclass
class OnnxPredictor:
    """ONNX Runtime twin of `digitlab.inference.Predictor`: same `predict_proba` and `meta`."""

    session: Any  # onnxruntime.InferenceSession
    meta: dict[str, Any]
    batch_size: int = 2048
    precision: str = "fp32"
    backend: str = "onnx"
    models: list[nn.Module] = field(default_factory=list)  # none: the graph lives in the session

    @property
    def members(self) -> int:
        return len(self.meta.get("member_meta", [])) or 1

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 logits for uint8 images (N, 28, 28)."""
        from digitlab.pixels import as_uint8_images

        images = as_uint8_images(images, "images")
        scale = float(self.meta.get("input", INPUT_NORMALISATION).get("scale", 1 / 255))
        out = [np.empty((0, 10), np.float32)]
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size, None].astype(np.float32) * np.float32(scale)
            out.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        return np.concatenate(out)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 softmax probabilities (temperature-scaled if the run was calibrated)."""
        from digitlab.calibration import apply_run_calibration

        logits = self.logits(images)
        logits = logits - logits.max(axis=1, keepdims=True)  # stable softmax
        exp = np.exp(logits)
        return apply_run_calibration((exp / exp.sum(axis=1, keepdims=True)).astype(np.float32), self.meta)


def onnx_session(model: bytes | str, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; `threads` intra-op threads (None: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise DigitlabError(f"ONNX Runtime cannot load the model ({exc.__class__.__name__}: {exc})") from None


def _meta_from_props(props: dict[str, str]) -> dict[str, Any]:
    return {
        "preset": props.get("preset") or None,
        "model": props.get("model") or None,
        "class_names": json.loads(props.get("class_names", json.dumps(CLASS_NAMES))),
        "input": {"scale": float(props.get("input_scale", 1 / 255)), "mean": float(props.get("input_mean", 0)),
                  "std": float(props.get("input_std", 1)),
                  "polarity": props.get("input_polarity", "light-on-dark")},
        "fingerprint": props.get("fingerprint", ""),
        "parameters": int(props["parameters"]) if props.get("parameters", "").isdigit() else None,
    }


def _is_fresh(onnx_path: Path, run_dir: Path) -> bool:
    """model.onnx exists and is newer than the weights (and ensemble manifest) it was made from."""
    if not onnx_path.is_file():
        return False
    sources = [run_dir / MODEL_FILE, run_dir / MODEL_META, run_dir / ENSEMBLE_FILE]
    newest = max((p.stat().st_mtime for p in sources if p.is_file()), default=0.0)
    return onnx_path.stat().st_mtime >= newest


def load_onnx_predictor(path: str | Path, batch_size: int = 2048, threads: int | None = None) -> OnnxPredictor:
    """An .onnx file written by `digitlab export`, or a run/ensemble folder.

    For a folder, RUN_DIR/model.onnx is used when present and newer than the weights;
    otherwise the model is exported in memory (nothing is written into the run folder).
    """
    from digitlab.calibration import calibration_meta
    from digitlab.inference import load_predictor

    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise DigitlabError(f"{path}: expected an .onnx file or a run folder")
        props = _read_props_safely(path)
        return OnnxPredictor(onnx_session(str(path), threads), _meta_from_props(props), batch_size)
    if not path.is_dir():
        raise DigitlabError(f"{path}: no such run folder or .onnx file")
    require_model_folder(path)
    meta = load_predictor(path, precision="fp32").meta if is_ensemble(path) else _read_meta(path)
    meta = {**meta, "fingerprint": model_fingerprint(meta), **calibration_meta(path)}
    onnx_path = path / ONNX_FILE
    if onnx_path.is_file() and not _is_fresh(onnx_path, path):
        # the weights (or an ensemble's member weights in ensemble.json) changed after the export
        log.warning("%s is older than the run's weights; exporting the run's weights again in memory", onnx_path)
    elif onnx_path.is_file() and _exported_from(onnx_path, meta):
        log.info("using %s", onnx_path)
        return OnnxPredictor(onnx_session(str(onnx_path), threads), meta, batch_size)
    log.info("exporting %s to ONNX in memory", path)
    return OnnxPredictor(onnx_session(export_onnx_bytes(path), threads), meta, batch_size)


def open_predictor(path: str | Path, backend: str = "torch", precision: str = "auto",
                   batch_size: int | None = None) -> ProbabilityModel:
    """A run or ensemble folder in torch (`inference.Predictor`) or in ONNX Runtime (`OnnxPredictor`,
    fp32 on the CPU, from RUN_DIR/model.onnx if fresh, else exported on the fly; `path` may also
    be an .onnx file). Both have `predict_proba(images)`, `members` and `meta`."""
    from digitlab.inference import load_predictor

    predictor: ProbabilityModel
    if backend == "onnx":
        predictor = load_onnx_predictor(path)
    elif backend == "torch":
        predictor = load_predictor(path, precision=precision)
    else:
        raise DigitlabError(f"unknown backend {backend!r}; choose torch or onnx")
    if batch_size is not None:
        predictor.batch_size = batch_size
    return predictor


def _exported_from(onnx_path: Path, meta: dict[str, Any]) -> bool:
    """Whether the file's recorded weights sha256 is the run's; a warning says why it is not used."""
    try:
        recorded = read_onnx_metadata(onnx_path).get("weights_sha256", "")
    except Exception as exc:  # onnx raises DecodeError and friends for a damaged file
        log.warning("%s is not a readable ONNX model (%s); exporting the weights again", onnx_path,
                    exc.__class__.__name__)
        return False
    expected = weights_digest(meta)
    if recorded and recorded == expected:
        return True
    why = (f"was exported from other weights (sha256 {recorded[:16]}, the run's are {expected[:16]})" if recorded
           else "records no weights sha256 (exported by an older digitlab)")
    log.warning("%s %s; exporting the run's weights again in memory", onnx_path, why)
    return False


def _read_meta(run_dir: Path) -> dict[str, Any]:
    from digitlab.checkpoint import read_model_meta

    return read_model_meta(run_dir)


def _read_props_safely(path: Path) -> dict[str, str]:
    try:
        return read_onnx_metadata(path)
    except Exception as exc:  # onnx raises DecodeError and friends for a non-ONNX file
        raise DigitlabError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
