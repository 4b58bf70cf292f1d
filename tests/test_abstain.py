"""Abstention: ink statistics and confidence turn non-digits into `uncertain` with a reason."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from digitlab.abstain import abstain_reason, ink_stats
from digitlab.data.preprocess import mnist_style

CONFIDENT = np.eye(10, dtype=np.float32)[3]
UNSURE = np.full(10, 0.1, dtype=np.float32)


def _drawn(draw) -> np.ndarray:
    image = Image.new("L", (200, 200), 0)
    draw(ImageDraw.Draw(image))
    return mnist_style(image)


def test_blank_is_too_little_ink() -> None:
    assert abstain_reason(np.zeros((28, 28), np.uint8), CONFIDENT) == "too little ink"


def test_a_dot_and_a_flat_line_are_not_digit_shaped() -> None:
    dot = _drawn(lambda d: d.ellipse((90, 90, 110, 110), fill=255))
    line = _drawn(lambda d: d.line((20, 100, 180, 100), fill=255, width=8))
    assert abstain_reason(dot, CONFIDENT) == "not digit-shaped"
    assert abstain_reason(line, CONFIDENT) == "not digit-shaped"


def test_two_strokes_side_by_side_are_several_digits() -> None:
    def two(d: ImageDraw.ImageDraw) -> None:
        d.line((50, 40, 50, 160), fill=255, width=10)
        d.ellipse((100, 50, 170, 150), outline=255, width=10)

    stats = ink_stats(_drawn(two))
    assert stats.side_by_side
    assert abstain_reason(_drawn(two), CONFIDENT) == "several digits"


def test_real_digits_pass_unless_the_model_is_unsure(mnist_test) -> None:
    images = mnist_test.images[:300]
    flagged = [abstain_reason(i, CONFIDENT) for i in images]
    assert sum(r is not None for r in flagged) <= 2
    assert abstain_reason(images[0], UNSURE, min_confidence=0.5) == "low confidence"
    assert abstain_reason(images[0], CONFIDENT, min_confidence=0.5) is None
