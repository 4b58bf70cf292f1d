"""Batch inference speed of a model preset (default seed2017) on the 10,000 MNIST test images.

Prints images/s per backend and batch size (best of --repeats timed passes after a warm-up).
Backends live in the BACKENDS dict: a name -> a factory taking (model, calibration images) and
returning a function uint8 (N, 28, 28) -> (N, 10) float probabilities. Add a backend there.

  .venv/bin/python benchmarks/predict_speed.py                      # random init: speed only
  .venv/bin/python benchmarks/predict_speed.py --run RUN_DIR        # trained weights: + accuracy
  .venv/bin/python benchmarks/predict_speed.py --backends fp32,bf16 --batch-sizes 1024
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from digitlab.checkpoint import load_model
from digitlab.data import load_mnist
from digitlab.inference import Predictor
from digitlab.models import create_model
from digitlab.runtime import prepare_model, to_input

ProbaFn = Callable[[np.ndarray], np.ndarray]
BackendFactory = Callable[[nn.Module, np.ndarray], ProbaFn]


def _batched(forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> ProbaFn:
    """Feed uint8 images in batches through `forward` (float (B, 1, 28, 28) -> logits)."""

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        x_all = torch.from_numpy(images)
        out = [torch.softmax(forward(to_input(x_all[i : i + batch_size])).float(), dim=1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy()

    return run


# ---------------------------------------------------------------- backends


def predictor_backend(precision: str) -> Callable[[nn.Module, np.ndarray, int], ProbaFn]:
    """The library's own path: digitlab.inference.Predictor (channels_last, autocast for bf16)."""

    def build(model: nn.Module, calib: np.ndarray, batch_size: int) -> ProbaFn:
        predictor = Predictor([prepare_model(copy.deepcopy(model), torch.device("cpu")).eval()], {},
                              torch.device("cpu"), precision, batch_size)
        return predictor.predict_proba

    return build


def jit_backend(dtype: torch.dtype) -> Callable[[nn.Module, np.ndarray, int], ProbaFn]:
    """TorchScript trace + freeze: folds weights into the graph and lets oneDNN fuse conv+ReLU.

    bf16 here means bf16 weights and activations end to end (no autocast casts per layer).
    """

    def build(model: nn.Module, calib: np.ndarray, batch_size: int) -> ProbaFn:
        m = copy.deepcopy(model).eval().to(dtype=dtype, memory_format=torch.channels_last)
        example = torch.zeros(batch_size, 1, 28, 28, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(m, example))
            traced = torch.jit.optimize_for_inference(traced)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return traced(x.to(dtype).contiguous(memory_format=torch.channels_last))

        return _batched(forward, batch_size)

    return build


def compile_backend(dtype: torch.dtype) -> Callable[[nn.Module, np.ndarray, int], ProbaFn]:
    """torch.compile (Inductor, C++ codegen + oneDNN) with weight freezing, for inference only."""

    def build(model: nn.Module, calib: np.ndarray, batch_size: int) -> ProbaFn:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights and pre-pack them for oneDNN
        m = copy.deepcopy(model).eval().to(dtype=dtype, memory_format=torch.channels_last)
        compiled = torch.compile(m, dynamic=False)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return compiled(x.to(dtype).contiguous(memory_format=torch.channels_last))

        return _batched(forward, batch_size)

    return build


def int8_backend(model: nn.Module, calib: np.ndarray, batch_size: int) -> ProbaFn:
    """Static int8 post-training quantization (torch.ao FX, x86 backend: fbgemm/oneDNN VNNI kernels).

    Calibrated on `calib` (training images, not the evaluated test images).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    m = copy.deepcopy(model).eval()
    example = (torch.zeros(1, 1, 28, 28),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for i in range(0, len(calib), 500):
                prepared(to_input(torch.from_numpy(calib[i : i + 500])))
        quantized = convert_fx(prepared)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return quantized(x.contiguous(memory_format=torch.channels_last))

    return _batched(forward, batch_size)


def onnx_backend(model: nn.Module, calib: np.ndarray, batch_size: int) -> ProbaFn:
    """ONNX Runtime (CPU provider) on the graph `digitlab export` writes; as many threads as torch."""
    from digitlab.export import OnnxPredictor, module_to_onnx, onnx_session

    session = onnx_session(module_to_onnx(copy.deepcopy(model).eval()), threads=torch.get_num_threads())
    return OnnxPredictor(session, {}, batch_size).predict_proba


BACKENDS: dict[str, Callable[[nn.Module, np.ndarray, int], ProbaFn]] = {
    "fp32": predictor_backend("fp32"),
    "bf16": predictor_backend("bf16"),
    "fp32-jit": jit_backend(torch.float32),
    "bf16-jit": jit_backend(torch.bfloat16),
    "int8": int8_backend,
    "onnx": onnx_backend,
    "fp32-compile": compile_backend(torch.float32),
    "bf16-compile": compile_backend(torch.bfloat16),
}
DEFAULT_BACKENDS = "fp32,bf16,fp32-jit,bf16-jit,int8,onnx"


# ---------------------------------------------------------------- measuring


def time_pass(fn: ProbaFn, images: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of `repeats` passes over all images, after one warm-up pass."""
    probs = fn(images)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - t0)
    return best, probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed2017", help="model preset (default: seed2017)")
    parser.add_argument("--run", default=None, help="run folder: use its trained weights and report accuracy")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"comma-separated, of: {', '.join(BACKENDS)} (default: {DEFAULT_BACKENDS})")
    parser.add_argument("--batch-sizes", default="256,1024,4096", help="comma-separated (default: 256,1024,4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per cell; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.run:
        model, meta = load_model(args.run)
        model_name, weights = meta["model"], f"trained ({args.run})"
    else:
        model, model_name, weights = create_model(args.model), args.model, "random init"
    model.eval()
    test = load_mnist("test")
    calib = load_mnist("train").images[:2000]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = [b.strip() for b in args.backends.split(",")]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")

    print(f"# {model_name}, {weights}; {len(test):,} MNIST test images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'} "
          f"({torch.backends.cpu.get_cpu_capability()}); best of {args.repeats}")
    header = f"{'backend':<14}" + "".join(f"{'batch ' + str(b):>13}" for b in batch_sizes) + "   accuracy"
    print(header)
    print("-" * len(header))
    reference: np.ndarray | None = None
    for name in names:
        cells, accuracy = [], ""
        for b in batch_sizes:
            try:
                fn = BACKENDS[name](model, calib, b)
                seconds, probs = time_pass(fn, test.images, args.repeats)
            except Exception as exc:  # one backend failing (no compiler, unsupported op) is a result too
                print(f"{name:<14}failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:80]}")
                cells = []
                break
            cells.append(f"{len(test) / seconds:>11,.0f}/s")
            predicted = probs.argmax(1)
            if name == names[0] and reference is None:
                reference = predicted
            if args.run:
                agree = (predicted == reference).mean() if reference is not None else 1.0
                accuracy = f"   {100 * (predicted == test.labels).mean():.2f}% (agrees {100 * agree:.2f}%)"
        if cells:
            print(f"{name:<14}" + "".join(f"{c:>13}" for c in cells) + accuracy, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
