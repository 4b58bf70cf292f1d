"""Non-digits to train on, so that a model learns to be unsure of them (outlier exposure).

A 10-class network trained on digits alone answers a letter or a scribble with a confident digit.
Outlier exposure (Hendrycks, Mazeika & Dietterich 2019) adds images of no class to training and
pushes the model's output on them towards the uniform distribution; the calibrated confidence
threshold of `digitlab.abstain` then flags most non-digits. These images are drawn here, seeded,
on a large canvas and sent through the same MNIST-style preprocessing as an upload.

They are deliberately not the non-digits of `benchmarks/abstain.py`, which measures the result:
strokes are Bezier curves, not random walks; glyphs come from Pillow's built-in font (or
symbols drawn by hand), not the system's TrueType faces; pairs of digits come from the
training images, not MNIST test.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from digitlab.errors import DigitlabError

SIDE = 160
# Letters that are digits in many hands (O/0, l/I/J/1, S/5, Z/2, B/8, g/q/9, b/6, G/6, T/7, y/4) and
# bracket-like symbols (1) stay out: teaching the model they are not digits would teach it to doubt
# real digits.
GLYPHS = "".join(c for c in string.ascii_letters if c not in "OoIlJjiSsZzBbgqGTyt") + "#%&*+<>?@~=^"


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("L", (SIDE, SIDE), 0)
    return image, ImageDraw.Draw(image)


def _width(rng: np.random.Generator) -> int:
    return int(rng.integers(4, 14))


def strokes(rng: np.random.Generator) -> Image.Image:
    """Two to four cubic Bezier strokes through random control points (one alone is often a 1, 7 or 2)."""
    image, draw = _canvas()
    t = np.linspace(0, 1, 40)[:, None]
    for _ in range(int(rng.integers(2, 5))):
        p = rng.uniform(15, SIDE - 15, (4, 2))
        curve = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3])
        draw.line([tuple(q) for q in curve], fill=255, width=_width(rng), joint="curve")
    return image


def bars(rng: np.random.Generator) -> Image.Image:
    """One to three parallel dashes within 30 degrees of horizontal ("-", "=", a crossed-out word)."""
    image, draw = _canvas()
    angle, length = np.deg2rad(rng.uniform(-30, 30)), rng.uniform(50, 150)
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    count = int(rng.integers(1, 4))
    for i in range(count):
        y = SIDE / 2 + (i - (count - 1) / 2) * rng.uniform(18, 30)
        draw.line((SIDE / 2 - dx, y - dy, SIDE / 2 + dx, y + dy), fill=255, width=_width(rng))
    return image


def blobs(rng: np.random.Generator) -> Image.Image:
    """A filled polygon or ellipse: a smudge, a dot, a filled box."""
    image, draw = _canvas()
    centre, radius = rng.uniform(50, 110, 2), rng.uniform(6, 45)
    if rng.random() < 0.5:
        draw.ellipse((*(centre - radius), *(centre + radius * rng.uniform(0.5, 1.5))), fill=255)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
        spokes = np.stack([np.cos(angles), np.sin(angles)], 1) * rng.uniform(0.5, 1.2, (len(angles), 1))
        points = centre + radius * spokes
        draw.polygon([tuple(q) for q in points], fill=255)
    return image


def _builtin_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable face
    except (TypeError, OSError, ImportError):  # pragma: no cover - older Pillow: the bitmap font
        return ImageFont.load_default()


def glyphs(rng: np.random.Generator) -> Image.Image:
    """A letter or symbol in Pillow's built-in font, sometimes two side by side."""
    image, draw = _canvas()
    font = _builtin_font(int(rng.integers(70, 120)))
    text = "".join(GLYPHS[int(rng.integers(len(GLYPHS)))] for _ in range(int(rng.integers(1, 3))))
    draw.text((SIDE / 2, SIDE / 2), text, fill=255, font=font, anchor="mm")
    return image


def speckle(rng: np.random.Generator) -> Image.Image:
    """Many small blobs: dust, a dirty scan."""
    image, draw = _canvas()
    for _ in range(int(rng.integers(8, 60))):
        x, y, r = *rng.uniform(5, SIDE - 5, 2), rng.uniform(1, 5)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return image


def pair(rng: np.random.Generator, digits: np.ndarray) -> Image.Image:
    """Two training digits side by side, overlapping a little or a few pixels apart."""
    a, b = digits[rng.integers(len(digits), size=2)]
    gap = int(rng.integers(-4, 6))
    canvas = np.zeros((28, 56 + gap), np.uint8)
    canvas[:, :28] = a
    canvas[:, 28 + gap :] = np.maximum(canvas[:, 28 + gap :], b)
    return Image.fromarray(canvas)


def non_digit_images(count: int, seed: int, digits: np.ndarray) -> np.ndarray:
    """uint8 (count, 28, 28): the kinds above in equal shares, preprocessed as uploads are."""
    from digitlab.data.preprocess import mnist_style

    rng = np.random.default_rng(seed)
    kinds: list[Callable[[np.random.Generator], Image.Image]] = [
        strokes, bars, blobs, glyphs, speckle, lambda r: pair(r, digits)]
    out = np.zeros((count, 28, 28), np.uint8)
    for i in range(count):
        with contextlib.suppress(DigitlabError):  # all ink cropped away: left blank, still a non-digit
            out[i] = mnist_style(kinds[i % len(kinds)](rng))
    return out
