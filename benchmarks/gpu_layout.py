"""Milliseconds per training step (forward, backward, optimizer; no augmentation, no data loading)
of the presets' networks in each memory layout (NCHW, the CUDA default here, or channels_last,
what the CPU uses) and with cuDNN's convolution choice pinned (deterministic, what `train` sets on
CUDA so that resume is exact) or timed (`cudnn.benchmark`). It isolates what the layout and the
determinism cost, which the whole-loop benchmarks (gpu_speed, time_to_accuracy) cannot.

    python benchmarks/gpu_layout.py [--presets fast seed2017 best] [--device cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from digitlab.models import create_model
from digitlab.presets import get_preset
from digitlab.runtime import autocast, resolve_device, resolve_precision
from digitlab.train import build_optimizer


def step_ms(preset: str, device: torch.device, channels_last: bool, pinned: bool, steps: int) -> float:
    torch.backends.cudnn.deterministic = pinned
    torch.backends.cudnn.benchmark = not pinned
    config = get_preset(preset)
    precision = resolve_precision("auto", device)
    generator = torch.Generator(device=device).manual_seed(0)
    model = create_model(config.model, **config.model_args).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = build_optimizer(model, config)
    x = torch.rand(config.batch_size, 1, 28, 28, device=device, generator=generator)
    x = x.contiguous(memory_format=layout)
    y = torch.randint(0, 10, (config.batch_size,), device=device, generator=generator)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fast", "seed2017", "best"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {card}, {resolve_precision('auto', device)}, {args.steps} steps each\n")
    print("| preset | batch | NCHW pinned | channels_last pinned | NCHW benchmark | channels_last benchmark |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        cells = [f"{step_ms(preset, device, cl, pinned, args.steps):.3f} ms"
                 for pinned in (True, False) for cl in (False, True)]
        print(f"| {preset} | {get_preset(preset).batch_size} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
