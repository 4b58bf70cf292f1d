"""Batched augmentation: shapes, value range, reproducibility, and the transforms' geometry."""

from __future__ import annotations

import pytest
import torch

from digitlab.augment import (
    AugmentConfig,
    augment_batch,
    dilate,
    elastic_displacement,
    erode,
    random_affine_matrices,
    random_background,
    rotate,
    translate,
)
from digitlab.presets import get_preset


def _digits(n: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a vertical bar, like a "1"
    return x


CONFIGS = [
    AugmentConfig(rotation=15, zoom=1.0),  # seed2017
    AugmentConfig(rotation=10, zoom=0.1, shift=0.1, shear=10, fill="constant"),
    AugmentConfig(elastic_alpha=34, elastic_sigma=4),
]


def test_shapes_range_and_reproducibility() -> None:
    x = _digits()
    for config in CONFIGS:
        a = augment_batch(x, config, torch.Generator().manual_seed(3))
        b = augment_batch(x, config, torch.Generator().manual_seed(3))
        c = augment_batch(x, config, torch.Generator().manual_seed(4))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert not torch.equal(a, x)


def test_disabled_config_is_identity() -> None:
    x = _digits()
    assert torch.equal(augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0)), x)


def test_seed2017_zoom_follows_keras_range() -> None:
    config = get_preset("seed2017").augment
    m = random_affine_matrices(20000, AugmentConfig(zoom=config.zoom), torch.Generator().manual_seed(0))
    zx, zy = m[:, 0, 0], m[:, 1, 1]
    # zoom_range=1: each factor uniform in [0, 2], x and y independent
    assert 0 <= zx.min() < 0.01 and 1.99 < zx.max() <= 2
    assert abs(zx.mean() - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([zx, zy]))[0, 1]) < 0.03
    assert config.rotation == 15 and config.fill == "nearest"


def test_rotation_range_is_respected() -> None:
    m = random_affine_matrices(5000, AugmentConfig(rotation=15), torch.Generator().manual_seed(0))
    angles = torch.rad2deg(torch.atan2(m[:, 1, 0], m[:, 0, 0]))
    assert angles.abs().max() <= 15.0001 and angles.abs().max() > 14.9


def test_rotate_by_90_turns_a_vertical_bar_horizontal() -> None:
    x = _digits(1)
    y = rotate(x, 90.0, fill="constant")
    rows = y[0, 0].sum(1)
    cols = y[0, 0].sum(0)
    assert (cols > 0.5).sum() > (rows > 0.5).sum()


def test_translate_moves_ink_by_whole_pixels() -> None:
    x = _digits(1)
    y = translate(x, 3, 0)
    assert torch.allclose(y[0, 0, :, 15:19], x[0, 0, :, 12:16], atol=1e-5)


def test_elastic_field_is_smooth_and_scaled() -> None:
    field = elastic_displacement(8, (28, 28), alpha=34, sigma=4, generator=torch.Generator().manual_seed(0))
    assert field.shape == (8, 28, 28, 2)
    assert field.abs().max() < 34
    neighbour_step = (field[:, 1:] - field[:, :-1]).abs().mean()
    assert neighbour_step < 0.25 * field.abs().mean()  # smoothed: neighbours move together


# Photometric transforms (issue 13) -------------------------------------------------------------

ROBUST = AugmentConfig(thickness=1.0, blur=0.5, low_resolution=0.5, noise=0.5, background=0.5)


def test_presets_augment_exactly_as_before_the_photometric_transforms() -> None:
    """Checksums of augment_batch computed on main before the new fields existed."""
    import hashlib

    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    expected = {"seed2017": "2905c5df1eca0609", "quick": "b07b108dea7939c5",
                "fast-long": "e687eaa739e0b506", "best": "58b652b20e56398d"}
    for name, digest in expected.items():
        out = augment_batch(x.clone(), get_preset(name).augment, torch.Generator().manual_seed(7))
        assert hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] == digest, name
        assert not get_preset(name).augment.photometric


@pytest.mark.parametrize("field", ["thickness", "blur", "low_resolution", "noise", "background"])
def test_each_photometric_transform_is_seeded_and_changes_images(field: str) -> None:
    config = AugmentConfig(**{field: 1.0})
    assert config.enabled and config.photometric
    x = _digits()
    a = augment_batch(x, config, torch.Generator().manual_seed(3))
    b = augment_batch(x, config, torch.Generator().manual_seed(3))
    c = augment_batch(x, config, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_probability_zero_point_five_leaves_some_images_alone() -> None:
    x = _digits(64)
    y = augment_batch(x, AugmentConfig(background=0.5), torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    assert 10 < int(same.sum()) < 54


def test_dilation_adds_ink_and_erosion_removes_it() -> None:
    x = _digits(1)
    assert dilate(x, 3).sum() > 1.4 * x.sum()
    assert erode(x, 2).sum() < 0.8 * x.sum()
    assert torch.all(dilate(x, 2) >= x) and torch.all(erode(x, 2) <= x)


def test_background_lights_the_paper() -> None:
    x = _digits(32)
    y = random_background(x, 1.0, torch.Generator().manual_seed(0))
    assert y[x == 0].mean() > 0.1


def test_photometric_transforms_follow_the_device() -> None:
    x = _digits()
    device = x.device
    y = augment_batch(x, ROBUST, torch.Generator(device=device).manual_seed(0))
    assert y.device == device
    if torch.cuda.is_available():
        xc = x.cuda()
        yc = augment_batch(xc, ROBUST, torch.Generator(device=xc.device).manual_seed(0))
        assert yc.device == xc.device
