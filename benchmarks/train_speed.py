"""Training throughput of a preset on this machine: images/s in fp32 and bf16 with the
preset's augmentation, seconds per epoch, and FLOP utilisation against a measured matmul peak.

    python benchmarks/train_speed.py [--preset seed2017] [--steps 40] [--accuracy-check]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from digitlab.augment import augment_batch
from digitlab.data import load_mnist
from digitlab.models import create_model
from digitlab.presets import get_preset
from digitlab.runtime import autocast, cpu_has_fast_bf16, prepare_model, to_input
from digitlab.train import build_optimizer, fit


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-3 GFLOP/s of an n x n matmul: the practical ceiling for conv layers."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops_per_image(model_name: str) -> float:
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    model = create_model(model_name)
    x = torch.rand(8, 1, 28, 28)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    return counter.get_total_flops() / 8


def images_per_second(preset: str, precision: str, steps: int, warmup: int = 5, repeats: int = 3) -> float:
    """Best of `repeats` timed runs of `steps` optimizer steps, augmentation included."""
    config = get_preset(preset)
    data = load_mnist("train")
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = prepare_model(create_model(config.model, **config.model_args), device).train()
    optimizer = build_optimizer(model, config)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(0)
    bs = config.batch_size

    def step() -> None:
        index = torch.randint(0, len(images), (bs,), generator=gen)
        x = to_input(images[index])
        if config.augment.enabled:
            x = augment_batch(x, config.augment, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    for _ in range(warmup):
        step()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = max(best, steps * bs / (time.perf_counter() - t0))
    return best


def accuracy_check(preset: str, epochs: int) -> dict[str, float]:
    """Same recipe, same seed, fp32 vs bf16: validation accuracy on a 50k/10k MNIST split."""
    out = {}
    for precision in ("fp32", "bf16"):
        config = get_preset(preset).with_overrides(epochs=epochs, precision=precision, val_split=1 / 6)
        with tempfile.TemporaryDirectory() as tmp:
            result = fit(config, os.path.join(tmp, "run"))
        out[precision] = result.final["val_acc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed2017")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per repeat")
    parser.add_argument("--epoch-images", type=int, default=33_600, help="images per epoch to convert to seconds "
                        "(33,600 = the seed notebook's training split)")
    parser.add_argument("--accuracy-check", action="store_true", help="also train fp32 and bf16 for "
                        "--check-epochs epochs and compare validation accuracy")
    parser.add_argument("--check-epochs", type=int, default=3)
    args = parser.parse_args()

    precisions = ["fp32", "bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ["fp32"]
    flops = train_flops_per_image(get_preset(args.preset).model)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, native bf16: {cpu_has_fast_bf16()}")
    print(f"preset {args.preset}: {flops / 1e6:.1f} MFLOP per training image (forward + backward)")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s\n")
    print(f"| precision | images/s | s per epoch ({args.epoch_images:,} img) | GFLOP/s | % of matmul peak |")
    print("|---|---:|---:|---:|---:|")
    for precision in precisions:
        ips = images_per_second(args.preset, precision, args.steps)
        gflops = ips * flops / 1e9
        print(f"| {precision} | {ips:,.0f} | {args.epoch_images / ips:.1f} | {gflops:.0f} | "
              f"{100 * gflops / peaks[precision]:.0f}% |")
    if args.accuracy_check:
        acc = accuracy_check(args.preset, args.check_epochs)
        print(f"\nval accuracy after {args.check_epochs} epochs (50k/10k split): "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))


if __name__ == "__main__":
    main()
