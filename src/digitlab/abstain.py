"""Say "unsure" instead of a confident wrong digit: ink statistics plus calibrated confidence.

Pure functions on the 28x28 uint8 image the model saw (light ink on black, MNIST-style) and
its (calibrated) probabilities. The ink thresholds were read off a validation split of
mnist:train (benchmarks/abstain.py prints the quantiles they come from); the confidence
threshold is each run's own, chosen on its validation split by `digitlab.calibration`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from digitlab.calibration import DEFAULT_MIN_CONFIDENCE

INK = 64  # a pixel at or above this (of 255) is ink; below, anti-aliasing haze
# Ink thresholds, from the validation split of mnist:train (5,999 digits, seed 0) as printed by
# `python benchmarks/abstain.py`: fewest ink pixels of any digit 32 (0.1% quantile 37);
MIN_INK_PIXELS = 20
# a filled blob (a dot or smudge scaled up): the radius of the largest disk that fits inside the ink.
# It measures solidity, not pen width: validation digits reach 6.3 px (99.9% quantile 5.1) and the
# same digits drawn with a marker (corruptions.thick_stroke, strokes 2 px wider) 9.2 (99.9% quantile
# 7.8), while a dot scaled to 20 px reaches 10;
MAX_RADIUS = 8.0
# and ink spread over the whole box (noise, a dirty scan): more ink pixels than any validation digit,
# even with a marker (378) or motion-blurred (388). The rules these replace (a box over 76% ink,
# over 280 ink pixels: just above plain digits) called 17% of marker-drawn validation digits and 4%
# of low-resolution ones "not digit-shaped"; these call 0.1% of each, and catch as many of
# digitlab.outliers' blobs and speckle.
MAX_INK_PIXELS = 400
MIN_HEIGHT = 7  # rows of the ink box: digits are scaled to ~20 rows (min 8); a flat stroke is not
MAX_COMPONENTS = 4  # separate 8-connected ink pieces: digits have at most 4; noise many
SECOND_PIECE = 0.2  # a second piece this share of the ink, beside (not above) the first: two digits

REASONS = ("too little ink", "not digit-shaped", "several digits", "low confidence")


@dataclass(frozen=True)
class InkStats:
    pixels: int  # ink pixels
    height: int  # ink bounding box, rows
    width: int  # and columns
    radius: float  # of the largest disk inside the ink (Euclidean distance transform), pixels
    components: int  # 8-connected ink pieces
    side_by_side: bool  # two big pieces whose column ranges do not overlap


def ink_stats(image: np.ndarray) -> InkStats:
    """Statistics of one uint8 (28, 28) image."""
    ink = np.asarray(image) >= INK
    pixels = int(ink.sum())
    if pixels == 0:
        return InkStats(0, 0, 0, 0.0, 0, False)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    labels, count = ndimage.label(ink, structure=np.ones((3, 3), bool))
    side_by_side = False
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        big = np.flatnonzero(sizes >= SECOND_PIECE * pixels) + 1
        spans = [np.flatnonzero((labels == k).any(axis=0)) for k in big]
        side_by_side = any(a[-1] < b[0] or b[-1] < a[0] for i, a in enumerate(spans) for b in spans[i + 1 :])
    # padded: beyond the frame is paper, not ink (ink touching an edge is no more solid for it)
    radius = float(ndimage.distance_transform_edt(np.pad(ink, 1)).max())
    return InkStats(pixels, height, width, radius, int(count), side_by_side)


def abstain_reason(image: np.ndarray, probs: np.ndarray, min_confidence: float = DEFAULT_MIN_CONFIDENCE
                   ) -> str | None:
    """Why this prediction should not be trusted, or None if it may be shown as a digit."""
    s = ink_stats(image)
    if s.pixels < MIN_INK_PIXELS:
        return "too little ink"
    if s.side_by_side:
        return "several digits"
    blob = s.radius >= MAX_RADIUS or s.pixels > MAX_INK_PIXELS
    if blob or s.height < MIN_HEIGHT or s.components > MAX_COMPONENTS:
        return "not digit-shaped"
    if float(np.max(probs)) < min_confidence:
        return "low confidence"
    return None


def abstain_reasons(images: np.ndarray, probs: np.ndarray, min_confidence: float = DEFAULT_MIN_CONFIDENCE
                    ) -> list[str | None]:
    """`abstain_reason` for each of uint8 (N, 28, 28) images and their (N, 10) probabilities."""
    return [abstain_reason(i, p, min_confidence) for i, p in zip(images, probs, strict=True)]


def min_confidence(meta: dict) -> float:
    """The run's calibrated confidence threshold (its meta carries it once calibrated)."""
    return float(meta.get("calibration", {}).get("min_confidence", DEFAULT_MIN_CONFIDENCE))
