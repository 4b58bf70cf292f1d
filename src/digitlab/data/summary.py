"""Plain-number description of a data set for `digitlab data info`."""

from __future__ import annotations

from digitlab.data.dataset import DigitData


def describe(data: DigitData) -> dict:
    pixels = data.images.astype("float64") / 255.0
    return {
        "source": data.source,
        "count": len(data),
        "class_counts": None if data.labels is None else [int(c) for c in data.class_counts()],
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
        "fingerprint": data.fingerprint,
    }
