"""Corruptions: deterministic per seed, uint8 (N, 28, 28) in and out, and they do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from digitlab.corruptions import CORRUPTIONS, MNIST_C, REAL_WRITING, corrupt, list_corruptions
from digitlab.errors import DigitlabError


def _digits(n: int = 6) -> np.ndarray:
    """Synthetic digits: a ring ("0") and a bar ("1"), strokes 3 pixels wide, in the centre."""
    yy, xx = np.mgrid[0:28, 0:28]
    r = np.hypot(yy - 14, xx - 14)
    ring = ((r > 5) & (r < 8)) * 255
    bar = ((xx >= 13) & (xx < 16) & (yy >= 5) & (yy < 23)) * 255
    return np.stack([ring if i % 2 == 0 else bar for i in range(n)]).astype(np.uint8)


def test_registry_covers_mnist_c_and_real_writing() -> None:
    assert len(MNIST_C) == 15 and len(REAL_WRITING) == 10
    assert list_corruptions() == list(MNIST_C + REAL_WRITING)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_deterministic_shape_dtype_and_changes_the_image(name: str) -> None:
    x = _digits()
    a, b = corrupt(x, name, seed=3), corrupt(x, name, seed=3)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, x)
    assert np.array_equal(x, _digits())  # the input is left alone


SEEDLESS = ("canny_edges", "thick_stroke", "thin_stroke", "tight_crop")


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in SEEDLESS])
def test_seed_changes_random_corruptions(name: str) -> None:
    x = _digits()
    assert not np.array_equal(corrupt(x, name, seed=1), corrupt(x, name, seed=2))


def test_stroke_thickness() -> None:
    x = _digits()
    thick, thin = corrupt(x, "thick_stroke"), corrupt(x, "thin_stroke")
    ink = (x > 127).sum()
    assert (thick > 127).sum() > 1.5 * ink
    assert 0 < (thin > 127).sum() < 0.8 * ink
    assert np.all(thick >= x)  # dilation never removes ink


def test_geometry_keeps_ink_and_moves_it() -> None:
    x = _digits()
    for name in ("rotate", "shear", "slant", "translate", "off_centre"):
        y = corrupt(x, name, seed=0)
        assert abs(int(y.astype(int).sum()) - int(x.astype(int).sum())) < 0.15 * x.astype(int).sum(), name
    moved = corrupt(x, "off_centre", seed=0)
    edges = [moved[:, 0], moved[:, -1], moved[:, :, 0], moved[:, :, -1]]
    touches = np.any([edge.max(1) > 0 for edge in edges], axis=0)
    assert touches.all()
    small = corrupt(x, "scale", seed=0)
    assert (small > 127).sum() < 0.6 * (x > 127).sum()


def test_tight_crop_fills_the_frame() -> None:
    y = corrupt(_digits(), "tight_crop")
    rows = (y > 127).any(axis=2)
    assert rows[:, 0].all() and rows[:, -1].all()


def test_photometric_corruptions_light_the_background() -> None:
    x = _digits()
    background = x == 0
    for name in ("brightness", "grey_paper", "fog", "uneven_light"):
        y = corrupt(x, name, seed=0)
        assert y[background].mean() > 40, name


def test_edges_keep_the_outline_only() -> None:
    x = _digits()
    y = corrupt(x, "canny_edges")
    assert 0 < (y > 0).sum() < 1.5 * (x > 0).sum()
    assert y[0, 14, 14] == 0  # the ring's hole stays empty


def test_bad_input_is_refused() -> None:
    with pytest.raises(DigitlabError, match="uint8"):
        corrupt(np.zeros((2, 28, 28), dtype=np.float32), "rotate")
    with pytest.raises(DigitlabError, match="unknown corruption"):
        corrupt(_digits(), "nope")
