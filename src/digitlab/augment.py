"""Batched, device-agnostic augmentation: pure tensor functions with an explicit generator.

Images are `(B, 1, H, W)` float tensors in [0, 1]. Every random draw takes a
`torch.Generator`, so the same seed gives the same batch on the same machine, and no
per-sample Python runs in the training loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from digitlab.config import AugmentConfig


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def random_affine_matrices(
    n: int, config: AugmentConfig, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates in affine_grid's [-1, 1] units.

    Composed as Keras 2 does: rotation, then shift, then shear, then zoom.
    """
    device = torch.device(device)
    theta = torch.deg2rad(_uniform(n, -config.rotation, config.rotation, generator, device))
    shear = torch.deg2rad(_uniform(n, -config.shear, config.shear, generator, device))
    zx = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator, device)
    zy = _uniform(n, 1 - config.zoom, 1 + config.zoom, generator, device)
    # a shift of `s` image sides is 2*s in normalised coordinates
    tx = _uniform(n, -config.shift, config.shift, generator, device) * 2
    ty = _uniform(n, -config.shift, config.shift, generator, device) * 2

    def batch(a, b, c, d):  # 2x2 per sample
        return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)

    zeros, ones = torch.zeros_like(theta), torch.ones_like(theta)
    rotate = batch(torch.cos(theta), -torch.sin(theta), torch.sin(theta), torch.cos(theta))
    shear_m = batch(ones, -torch.sin(shear), zeros, torch.cos(shear))
    zoom_m = batch(zx, zeros, zeros, zy)
    linear = rotate @ shear_m @ zoom_m
    return torch.cat([linear, torch.stack([tx, ty], -1).unsqueeze(-1)], dim=-1)


def apply_affine(images: torch.Tensor, matrices: torch.Tensor, fill: str = "nearest") -> torch.Tensor:
    """Resample `(B, 1, H, W)` images through per-sample (B, 2, 3) output->input matrices."""
    grid = F.affine_grid(matrices.to(images.dtype), list(images.shape), align_corners=False)
    padding = "border" if fill == "nearest" else "zeros"
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_affine(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    matrices = random_affine_matrices(len(images), config, generator, images.device)
    return apply_affine(images, matrices, config.fill)


def rotate(images: torch.Tensor, degrees: float, fill: str = "nearest") -> torch.Tensor:
    """Rotate every image by the same angle (test-time augmentation uses this)."""
    t = math.radians(degrees)
    m = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    return apply_affine(images, m.expand(len(images), 2, 3).to(images.device), fill)


def translate(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Shift every image by (dx, dy) pixels, filling with background (0)."""
    _, _, h, w = images.shape
    m = torch.tensor([[1.0, 0.0, -2 * dx / w], [0.0, 1.0, -2 * dy / h]])
    return apply_affine(images, m.expand(len(images), 2, 3).to(images.device), fill="constant")


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def elastic_displacement(
    n: int, size: tuple[int, int], alpha: float, sigma: float, generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Simard et al. (2003): uniform(-1, 1) fields smoothed by a Gaussian, scaled by alpha.

    Returns (n, H, W, 2) displacements in pixels (x, y).
    """
    device = torch.device(device)
    h, w = size
    field = torch.rand(n * 2, 1, h, w, generator=generator, device=device) * 2 - 1
    k = _gaussian_kernel(sigma, device)
    pad = len(k) // 2
    # separable blur; reflect padding keeps the field's edges from shrinking to zero
    field = F.conv2d(F.pad(field, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return (field * alpha).view(n, 2, h, w).permute(0, 2, 3, 1)


def elastic(images: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    disp = elastic_displacement(b, (h, w), alpha, sigma, generator, images.device)
    identity = torch.eye(2, 3, device=images.device).expand(b, 2, 3)
    grid = F.affine_grid(identity, [b, 1, h, w], align_corners=False)
    # pixels -> grid units per axis, as Python numbers: a tensor built from a list would be copied
    # from host memory every step, and on CUDA that copy waits for the card
    offset = torch.stack((disp[..., 0] * (2.0 / w), disp[..., 1] * (2.0 / h)), dim=-1)
    return F.grid_sample(images, grid + offset, mode="bilinear", padding_mode="zeros", align_corners=False)


def _chosen(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, 1, 1) mask: which images get a transform applied with probability p."""
    return (torch.rand(len(images), generator=generator, device=images.device) < p).view(-1, 1, 1, 1)


def _per_image(images: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return _uniform(len(images), low, high, generator, images.device).view(-1, 1, 1, 1)


def dilate(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level dilation by a size x size square: thicker strokes."""
    pad = (size // 2, (size - 1) // 2, size // 2, (size - 1) // 2)
    return F.max_pool2d(F.pad(images, pad), size, stride=1)


def erode(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level erosion (-dilate(-x)): thinner strokes."""
    return -dilate(-images, size)


def random_thickness(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p a 2x2 or 3x3 dilation or a 2x2 erosion (contrast restored), equally likely."""
    kind = torch.randint(0, 3, (len(images), 1, 1, 1), generator=generator, device=images.device)
    thin = erode(images, 2)
    thin = thin / thin.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3) * images.amax(dim=(2, 3), keepdim=True)
    out = torch.where(kind == 0, dilate(images, 2), torch.where(kind == 1, dilate(images, 3), thin))
    return torch.where(_chosen(images, p, generator), out, images)


def random_blur(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p a Gaussian blur, sigma uniform in [0.5, 1.2] pixels per image."""
    b, c, h, w = images.shape
    sigma = _uniform(b, 0.5, 1.2, generator, images.device).view(-1, 1)
    t = torch.arange(-3, 4, device=images.device, dtype=images.dtype).view(1, -1)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum(1, keepdim=True)).to(images.dtype)  # (B, 7): one kernel per image
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.repeat_interleave(c, 0).view(b * c, 1, 1, 7), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.repeat_interleave(c, 0).view(b * c, 1, 7, 1), groups=b * c)
    return torch.where(_chosen(images, p, generator), x.view(b, c, h, w), images)


def random_low_resolution(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p area-downsampled to 10, 13 or 16 pixels and bilinear back up.

    The three sizes are computed for the whole batch and picked per image, so no random number
    has to come back to the host (a sync point on a GPU).
    """
    size = images.shape[2:]
    kind = torch.randint(0, 3, (len(images), 1, 1, 1), generator=generator, device=images.device)
    out = images
    for i, side in enumerate((10, 13, 16)):
        small = F.interpolate(images, size=(side, side), mode="area")
        out = torch.where(kind == i, F.interpolate(small, size=size, mode="bilinear", align_corners=False), out)
    return torch.where(_chosen(images, p, generator), out, images)


def random_noise(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p Gaussian noise (std up to 0.15) or salt and pepper (up to 10%), equally likely."""
    dev = images.device
    gauss = images + torch.randn(images.shape, generator=generator, device=dev) * _per_image(images, 0, 0.15, generator)
    u = torch.rand(images.shape, generator=generator, device=dev)
    amount = _per_image(images, 0, 0.1, generator)
    salted = torch.where(u < amount / 2, torch.zeros_like(images), images)
    salted = torch.where((u >= amount / 2) & (u < amount), torch.ones_like(images), salted)
    kind = torch.rand(len(images), 1, 1, 1, generator=generator, device=dev) < 0.5
    return torch.where(_chosen(images, p, generator), torch.where(kind, gauss, salted), images)


def random_background(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p ink on grey paper: a level up to 0.45 plus a ramp up to 0.5 in a random
    direction, and the ink's own level lowered to 0.6-1 (an inverted photo under uneven light)."""
    _, _, h, w = images.shape
    dev = images.device
    angle = _per_image(images, 0, 2 * math.pi, generator)
    yy = torch.linspace(-0.5, 0.5, h, device=dev, dtype=images.dtype).view(1, 1, h, 1)
    xx = torch.linspace(-0.5, 0.5, w, device=dev, dtype=images.dtype).view(1, 1, 1, w)
    ramp = (xx * torch.cos(angle) + yy * torch.sin(angle)) / math.sqrt(2) + 0.5  # within [0, 1]
    paper = _per_image(images, 0, 0.45, generator) + _per_image(images, 0, 0.5, generator) * ramp
    ink = _per_image(images, 0.6, 1.0, generator)
    out = paper + images * (ink - paper).clamp_min(0.1)
    return torch.where(_chosen(images, p, generator), out, images)


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """All configured transforms on one batch; returns a new tensor of the same shape, in [0, 1]."""
    out = images
    if config.rotation or config.zoom or config.shift or config.shear:
        out = random_affine(out, config, generator)
    if config.elastic_alpha:
        out = elastic(out, config.elastic_alpha, config.elastic_sigma, generator)
    # the pen first, then what scanning or photographing it does
    if config.thickness:
        out = random_thickness(out, config.thickness, generator)
    if config.low_resolution:
        out = random_low_resolution(out, config.low_resolution, generator)
    if config.blur:
        out = random_blur(out, config.blur, generator)
    if config.background:
        out = random_background(out, config.background, generator)
    if config.noise:
        out = random_noise(out, config.noise, generator)
    return out.clamp_(0.0, 1.0) if out is not images else out
