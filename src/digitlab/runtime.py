"""Where and how a model runs: the device, the precision (bf16 autocast where the hardware has
it), the model's memory format, uint8 digits -> model input, and batched logits.

Shared by training and by everything that predicts (evaluate, predict, report, serve, export),
so neither side imports the other.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from digitlab.errors import DigitlabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DigitlabError("--device cuda: no CUDA device is available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DigitlabError("--device mps: no Apple MPS device is available on this machine")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (about 2x fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flags() & {
            "avx512_bf16",
            "amx_bf16",
        } != set()
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise DigitlabError("--precision bf16: this CPU has no bf16 support in oneDNN")
        return name
    if device.type == "cuda":
        # Before Ampere (T4, V100, P100: Kaggle's and Colab's usual cards) bf16 is only emulated, and
        # cuDNN has no bf16 convolutions there, so it would be slower than fp32; plain
        # is_bf16_supported() says True for those cards.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def device_description(device: torch.device) -> str:
    """What `train` prints: "cpu", or the card's name on CUDA ("cuda:0 (NVIDIA H100 80GB HBM3)")."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def configure_determinism(device: torch.device) -> None:
    """On CUDA, cuDNN picks convolution algorithms by timing them unless told otherwise, and some
    of those are not deterministic: pin deterministic ones so a resumed run repeats an uninterrupted one.
    (Process-wide flags; the CPU needs none.)"""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast for "bf16", else nothing; `cache=False` for code a CUDA graph captures."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cpu":
        # oneDNN's convolutions are fastest in NHWC (channels_last) on x86 CPUs
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack the keyword
    return model


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images_u8: torch.Tensor, batch_size: int = 1024, precision: str = "fp32",
    device: torch.device | None = None,
) -> torch.Tensor:
    """Float32 logits `(N, 10)` for uint8 images `(N, 28, 28)`, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images_u8), batch_size):
            x = to_input(images_u8[start : start + batch_size].to(device))
            with autocast(device, precision):
                out.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 10)
