"""Seeded image corruptions for robustness benchmarks, in the spirit of MNIST-C (Mu & Gilmer 2019).

Every corruption maps uint8 digits (N, 28, 28), white ink on black, to new uint8 digits of the
same shape; the same seed gives the same output. Besides MNIST-C's fifteen, they cover what real
writing varies: pen thickness, low resolution, slant, off-centre or badly cropped digits, JPEG
artefacts, grey paper and uneven light.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from digitlab.errors import DigitlabError

Corruption = Callable[[np.ndarray, int], np.ndarray]


def _check(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DigitlabError(f"corruptions expect uint8 images (N, H, W), got {images.dtype} {images.shape}")
    return images


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)


def _to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.squeeze(1).numpy()
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=n)


def _affine(images: np.ndarray, linear: np.ndarray, shift_px: np.ndarray | None = None) -> np.ndarray:
    """Per-image (N, 2, 2) output->input matrices about the centre, plus (N, 2) pixel shifts."""
    x = _to_float(images)
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, :, :2] = torch.from_numpy(linear.astype(np.float32))
    if shift_px is not None:
        # moving ink by +s pixels means sampling from -s: in [-1, 1] units that is -2s/side
        theta[:, 0, 2] = torch.from_numpy(-2 * shift_px[:, 0].astype(np.float32) / w)
        theta[:, 1, 2] = torch.from_numpy(-2 * shift_px[:, 1].astype(np.float32) / h)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return _to_uint8(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _dilate(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level dilation with a size x size square (the top-left bias of even sizes is kept)."""
    pad = (size // 2, (size - 1) // 2, size // 2, (size - 1) // 2)
    return F.max_pool2d(F.pad(x, pad), size, stride=1)


def _erode(x: torch.Tensor, size: int) -> torch.Tensor:
    return -_dilate(-x, size)


def _bounding_boxes(images: np.ndarray, threshold: int = 32) -> np.ndarray:
    """(N, 4) inclusive boxes (top, bottom, left, right) of the ink; the whole image if none."""
    ink = images > threshold
    rows, cols = np.asarray(ink.any(axis=2)), np.asarray(ink.any(axis=1))
    h, w = images.shape[1:]

    def first_last(m: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        any_ = m.any(axis=1)
        first = np.where(any_, m.argmax(axis=1), 0)
        last = np.where(any_, size - 1 - m[:, ::-1].argmax(axis=1), size - 1)
        return first, last

    top, bottom = first_last(rows, h)
    left, right = first_last(cols, w)
    return np.stack([top, bottom, left, right], axis=1)


def _draw(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> None:
    """Set pixels (N, K) of each canvas to full ink, ignoring those outside."""
    n, h, w = canvas.shape
    ys, xs = np.rint(ys).astype(int), np.rint(xs).astype(int)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    idx = np.broadcast_to(np.arange(n)[:, None], ys.shape)
    canvas[idx[inside], ys[inside], xs[inside]] = 255


# --- MNIST-C's fifteen ---------------------------------------------------------------------


def shot_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """Poisson photon noise at 60 photons for full ink (MNIST-C's severity)."""
    rng = np.random.default_rng(seed)
    lam = 60.0
    return _to_uint8(rng.poisson(images / 255.0 * lam) / lam)


def impulse_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """Salt and pepper on 27% of the pixels."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    u = rng.random(images.shape)
    out[u < 0.135] = 0
    out[(u >= 0.135) & (u < 0.27)] = 255
    return out


def glass_blur(images: np.ndarray, seed: int) -> np.ndarray:
    """Blur, jitter every pixel by up to one pixel, blur again (frosted glass)."""
    rng = np.random.default_rng(seed)
    x = _gaussian_blur(_to_float(images), 0.7).squeeze(1).numpy()
    n, h, w = x.shape
    dy = rng.integers(-1, 2, size=x.shape)
    dx = rng.integers(-1, 2, size=x.shape)
    yy = np.clip(np.arange(h)[None, :, None] + dy, 0, h - 1)
    xx = np.clip(np.arange(w)[None, None, :] + dx, 0, w - 1)
    x = x[np.arange(n)[:, None, None], yy, xx]
    return _to_uint8(_gaussian_blur(torch.from_numpy(x).unsqueeze(1), 0.7))


def motion_blur(images: np.ndarray, seed: int) -> np.ndarray:
    """The mean of 7 copies along a random direction, 6-9 pixels long (a moving camera)."""
    rng = np.random.default_rng(seed)
    n = len(images)
    angle = rng.uniform(0, math.pi, n)
    length = rng.uniform(6, 9, n)
    acc = np.zeros(images.shape, dtype=np.float64)
    ident = np.broadcast_to(np.eye(2), (n, 2, 2))
    for t in np.linspace(-0.5, 0.5, 7):
        shift = np.stack([np.cos(angle), np.sin(angle)], 1) * (length * t)[:, None]
        acc += _affine(images, ident, shift)
    return np.clip(np.rint(acc / 7), 0, 255).astype(np.uint8)


def shear(images: np.ndarray, seed: int) -> np.ndarray:
    """Vertical shear by 25-40 degrees either way."""
    rng = np.random.default_rng(seed)
    n = len(images)
    s = np.tan(np.deg2rad(rng.uniform(25, 40, n))) * _signs(rng, n)
    m = np.zeros((n, 2, 2))
    m[:, 0, 0] = m[:, 1, 1] = 1
    m[:, 1, 0] = s
    return _affine(images, m)


def scale(images: np.ndarray, seed: int) -> np.ndarray:
    """Shrink to 45-65% of the size (a small digit in a big box)."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.45, 0.65, len(images))
    return _affine(images, np.eye(2)[None] / f[:, None, None])


def _rotation(degrees: np.ndarray) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def rotate(images: np.ndarray, seed: int) -> np.ndarray:
    """Rotate by 25-45 degrees either way."""
    rng = np.random.default_rng(seed)
    n = len(images)
    return _affine(images, _rotation(rng.uniform(25, 45, n) * _signs(rng, n)))


def brightness(images: np.ndarray, seed: int) -> np.ndarray:
    """Lift every pixel by 35-45% of full scale (an overexposed background)."""
    rng = np.random.default_rng(seed)
    lift = rng.uniform(0.35, 0.45, (len(images), 1, 1))
    return _to_uint8(images / 255.0 + lift)


def translate(images: np.ndarray, seed: int) -> np.ndarray:
    """Move by 4-6 pixels in a random direction."""
    rng = np.random.default_rng(seed)
    n = len(images)
    angle = rng.uniform(0, 2 * math.pi, n)
    dist = rng.uniform(4, 6, n)
    shift = np.rint(np.stack([np.cos(angle), np.sin(angle)], 1) * dist[:, None])
    return _affine(images, np.broadcast_to(np.eye(2), (n, 2, 2)), shift)


def stripe(images: np.ndarray, seed: int) -> np.ndarray:
    """Invert a vertical stripe 3-5 pixels wide somewhere across the digit."""
    rng = np.random.default_rng(seed)
    n, _, w = images.shape
    width = rng.integers(3, 6, n)
    start = rng.integers(6, w - 10, n)
    cols = np.arange(w)[None, :]
    band = (cols >= start[:, None]) & (cols < (start + width)[:, None])  # (N, W)
    return np.where(band[:, None, :], 255 - images, images)


def fog(images: np.ndarray, seed: int) -> np.ndarray:
    """Add smooth low-frequency haze peaking at 40-60% of full scale."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    coarse = torch.from_numpy(rng.random((n, 1, 4, 4)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    haze = smooth.squeeze(1).numpy() * rng.uniform(0.4, 0.6, (n, 1, 1))
    return _to_uint8(np.maximum(images / 255.0, haze + images / 255.0 * (1 - haze)))


def spatter(images: np.ndarray, seed: int) -> np.ndarray:
    """Ink droplets: blobs of thresholded smooth noise stamped onto the image."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.random((len(images), 1, *images.shape[1:])).astype(np.float32))
    smooth = _gaussian_blur(noise, 1.0).squeeze(1).numpy()
    drops = np.clip((smooth - 0.62) * 10, 0, 1)
    return _to_uint8(np.maximum(images / 255.0, drops))


def _line(rng: np.random.Generator, n: int, size: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, points) coordinates of a straight line between random points on opposite edges."""
    t = np.linspace(0, 1, points)[None, :]
    y0, y1 = rng.uniform(3, size - 4, n)[:, None], rng.uniform(3, size - 4, n)[:, None]
    xs = np.broadcast_to(t * (size - 1), (n, points))
    ys = y0 + (y1 - y0) * t
    flip = rng.random(n) < 0.5  # half the lines run top to bottom
    return np.where(flip[:, None], xs, ys), np.where(flip[:, None], ys, xs)


def dotted_line(images: np.ndarray, seed: int) -> np.ndarray:
    """A line of dots, one every third pixel, across the image."""
    rng = np.random.default_rng(seed)
    n, h, _ = images.shape
    ys, xs = _line(rng, n, h, 10)
    out = images.copy()
    _draw(out, ys, xs)
    return out


def zigzag(images: np.ndarray, seed: int) -> np.ndarray:
    """A zigzag stroke (period 6-10 pixels, amplitude 2-4) across the image."""
    rng = np.random.default_rng(seed)
    n, h, _ = images.shape
    ys, xs = _line(rng, n, h, 120)
    period = rng.uniform(6, 10, (n, 1))
    amp = rng.uniform(2, 4, (n, 1))
    phase = np.linspace(0, 27, 120)[None, :] / period
    tri = amp * (4 * np.abs(phase - np.floor(phase + 0.5)) - 1)  # triangle wave in [-amp, amp]
    vertical = np.ptp(xs, axis=1, keepdims=True) > np.ptp(ys, axis=1, keepdims=True)
    out = images.copy()
    _draw(out, np.where(vertical, ys + tri, ys), np.where(vertical, xs, xs + tri))
    return out


def canny_edges(images: np.ndarray, seed: int) -> np.ndarray:
    """Outlines only: smoothed Sobel magnitude, thinned to its ridge along x or y, thresholded.

    A compact Canny (no hysteresis); the seed is unused, it is deterministic.
    """
    del seed
    x = _gaussian_blur(_to_float(images), 0.8)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
    mag = torch.hypot(gx, gy)
    pad = F.pad(mag, (1, 1, 1, 1))
    horiz = (mag >= pad[..., 1:-1, :-2]) & (mag >= pad[..., 1:-1, 2:])
    vert = (mag >= pad[..., :-2, 1:-1]) & (mag >= pad[..., 2:, 1:-1])
    ridge = torch.where(gx.abs() >= gy.abs(), horiz, vert)
    peak = mag.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return _to_uint8((ridge & (mag > 0.25 * peak)).float())


# --- what real writing varies ----------------------------------------------------------------


def thick_stroke(images: np.ndarray, seed: int) -> np.ndarray:
    """A marker: grey dilation with a 3x3 square (strokes 2 pixels wider)."""
    del seed
    return _to_uint8(_dilate(_to_float(images), 3))


def thin_stroke(images: np.ndarray, seed: int) -> np.ndarray:
    """A fine pen: grey erosion with a 2x2 square (strokes a pixel thinner), contrast restored."""
    del seed
    x = _erode(_to_float(images), 2)
    peak = x.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return _to_uint8(x / peak)


def low_resolution(images: np.ndarray, seed: int) -> np.ndarray:
    """Drawn small then enlarged: area-downsampled to 9-12 pixels, bilinear back up."""
    rng = np.random.default_rng(seed)
    x = _to_float(images)
    out = torch.empty_like(x)
    sizes = rng.integers(9, 13, len(images))
    for size in np.unique(sizes):
        idx = torch.from_numpy(np.flatnonzero(sizes == size))
        small = F.interpolate(x[idx], size=(int(size), int(size)), mode="area")
        out[idx] = F.interpolate(small, size=x.shape[2:], mode="bilinear", align_corners=False)
    return _to_uint8(out)


def slant(images: np.ndarray, seed: int) -> np.ndarray:
    """Italic writing: horizontal shear by 20-35 degrees either way."""
    rng = np.random.default_rng(seed)
    n = len(images)
    s = np.tan(np.deg2rad(rng.uniform(20, 35, n))) * _signs(rng, n)
    m = np.zeros((n, 2, 2))
    m[:, 0, 0] = m[:, 1, 1] = 1
    m[:, 0, 1] = s
    return _affine(images, m)


def off_centre(images: np.ndarray, seed: int) -> np.ndarray:
    """Moved until its bounding box touches a random edge (a digit drawn in a corner)."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    top, bottom, left, right = _bounding_boxes(images).T
    side = rng.integers(0, 4, n)
    dx = np.where(side == 0, -left, np.where(side == 1, w - 1 - right, 0))
    dy = np.where(side == 2, -top, np.where(side == 3, h - 1 - bottom, 0))
    # and a random slide along that edge, within the frame
    along = rng.uniform(-1, 1, n)
    dx = np.where(side >= 2, np.clip(along * 4, -left, w - 1 - right), dx)
    dy = np.where(side < 2, np.clip(along * 4, -top, h - 1 - bottom), dy)
    return _affine(images, np.broadcast_to(np.eye(2), (n, 2, 2)), np.rint(np.stack([dx, dy], 1)))


def tight_crop(images: np.ndarray, seed: int) -> np.ndarray:
    """Cropped to the ink and stretched to fill the frame (no margin, aspect ratio lost)."""
    del seed
    n, h, w = images.shape
    top, bottom, left, right = _bounding_boxes(images).T.astype(np.float64)
    # output [-1, 1] maps onto the box's pixel edges, in input [-1, 1] units
    m = np.zeros((n, 2, 2))
    m[:, 0, 0] = (right + 1 - left) / w
    m[:, 1, 1] = (bottom + 1 - top) / h
    centre = np.stack([(left + right + 1) / 2 - w / 2, (top + bottom + 1) / 2 - h / 2], 1)
    return _affine(images, m, -centre)  # the box centre moves to the image centre


def cut_off(images: np.ndarray, seed: int) -> np.ndarray:
    """A crop that cuts into the digit: 20-30% of its box blanked from one random side."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    top, bottom, left, right = _bounding_boxes(images).T
    frac = rng.uniform(0.2, 0.3, n)
    side = np.asarray(rng.integers(0, 4, n))[:, None, None]
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    cut_w = np.ceil((right - left + 1) * frac)[:, None, None]
    cut_h = np.ceil((bottom - top + 1) * frac)[:, None, None]
    blank = (
        ((side == 0) & (cols < left[:, None, None] + cut_w))
        | ((side == 1) & (cols > right[:, None, None] - cut_w))
        | ((side == 2) & (rows < top[:, None, None] + cut_h))
        | ((side == 3) & (rows > bottom[:, None, None] - cut_h))
    )
    return np.where(blank, 0, images).astype(np.uint8)


def jpeg(images: np.ndarray, seed: int) -> np.ndarray:
    """JPEG round trip at quality 5-15 (Pillow)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    qualities = rng.integers(5, 16, len(images))
    out = np.empty_like(images)
    for i, (img, q) in enumerate(zip(images, qualities, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("L"))
    return out


def grey_paper(images: np.ndarray, seed: int) -> np.ndarray:
    """An inverted photo of paper: background at 25-45% grey, ink at 65-90%, mild sensor noise."""
    rng = np.random.default_rng(seed)
    n = len(images)
    paper = rng.uniform(0.25, 0.45, (n, 1, 1))
    ink = rng.uniform(0.65, 0.9, (n, 1, 1))
    x = paper + images / 255.0 * (ink - paper) + rng.normal(0, 0.03, images.shape)
    return _to_uint8(x)


def uneven_light(images: np.ndarray, seed: int) -> np.ndarray:
    """A light gradient across the page: 0 on one side to 35-55% grey on the other."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    angle = rng.uniform(0, 2 * math.pi, (n, 1, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    proj = (xx[None] - w / 2) * np.cos(angle) + (yy[None] - h / 2) * np.sin(angle)
    ramp = (proj - proj.min(axis=(1, 2), keepdims=True)) / np.ptp(proj, axis=(1, 2), keepdims=True)
    ramp *= rng.uniform(0.35, 0.55, (n, 1, 1))
    return _to_uint8(np.maximum(images / 255.0, ramp + images / 255.0 * (1 - ramp)))


MNIST_C = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate",
           "brightness", "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges")
REAL_WRITING = ("thick_stroke", "thin_stroke", "low_resolution", "slant", "off_centre", "tight_crop",
                "cut_off", "jpeg", "grey_paper", "uneven_light")

CORRUPTIONS: dict[str, Corruption] = {name: globals()[name] for name in MNIST_C + REAL_WRITING}


def list_corruptions() -> list[str]:
    return list(CORRUPTIONS)


def corrupt(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Apply corruption `name` to uint8 images (N, 28, 28) with `seed`; a new uint8 array."""
    if name not in CORRUPTIONS:
        raise DigitlabError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}")
    images = _check(images)
    out = CORRUPTIONS[name](images, seed)
    assert out.shape == images.shape and out.dtype == np.uint8
    return out
