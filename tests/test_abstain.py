"""Abstention: ink statistics and confidence turn non-digits into `uncertain` with a reason."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from digitlab.abstain import MAX_INK_PIXELS, MAX_RADIUS, abstain_reason, ink_stats
from digitlab.corruptions import thick_stroke
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


def test_a_hatched_box_has_more_ink_than_any_digit() -> None:
    hatched = np.zeros((28, 28), np.uint8)
    hatched[1:27, 1:27] = 255
    hatched[2:27, 3:27:3] = 0  # stripes two pixels wide, joined along the top: no solid disk inside
    stats = ink_stats(hatched)
    assert stats.components == 1 and stats.radius < MAX_RADIUS and stats.pixels > MAX_INK_PIXELS
    assert abstain_reason(hatched, CONFIDENT) == "not digit-shaped"


def test_a_digit_drawn_small_or_with_a_marker_is_still_digit_shaped(mnist_test) -> None:
    # A "0" 80 px tall on the drawing page (280 px, its brush 280 / 14 wide) becomes, scaled up to
    # 20 px, a thick ring filling 78% of its box: the former fill rule called it "not digit-shaped".
    small_zero = _drawn(lambda d: d.ellipse((70, 60, 118, 140), outline=255, width=20))
    assert ink_stats(small_zero).radius < MAX_RADIUS
    assert abstain_reason(small_zero, CONFIDENT) is None
    # MNIST digits with strokes 2 px wider: the former rules flagged 35 of these 300
    marker = thick_stroke(mnist_test.images[:300], 0)
    assert sum(abstain_reason(i, CONFIDENT) is not None for i in marker) <= 2


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
