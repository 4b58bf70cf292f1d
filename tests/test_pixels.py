"""digitlab.pixels: the one validator of model input, and the same answers from every entry point."""

from __future__ import annotations

import numpy as np
import pytest

from digitlab.errors import DigitlabError
from digitlab.pixels import _PYTHON_CHECK_MAX, PIXELS, as_uint8_images


@pytest.mark.parametrize("shape, expected", [
    ((784,), (1, 28, 28)), ((28, 28), (1, 28, 28)), ((3, 784), (3, 28, 28)), ((3, 28, 28), (3, 28, 28)),
    ((0, 784), (0, 28, 28)),
])
def test_accepted_shapes(shape, expected):
    assert as_uint8_images(np.zeros(shape, np.int64), "x").shape == expected


@pytest.mark.parametrize("shape", [(783,), (4, 700), (2, 28, 27), (), (1, 1, 28, 28)])
def test_refused_shapes_name_the_shape(shape):
    with pytest.raises(DigitlabError, match=r"^x: got shape \["):
        as_uint8_images(np.zeros(shape), "x")


def test_one_image_only():
    assert as_uint8_images([0] * PIXELS, "p", one=True).shape == (28, 28)
    with pytest.raises(DigitlabError, match=r"p: expected 784 numbers \(28x28\), got shape \[2, 784\]"):
        as_uint8_images(np.zeros((2, PIXELS)), "p", one=True)


@pytest.mark.parametrize("values", [[True] * PIXELS, ["7"] * PIXELS, [None] * PIXELS, [[0] * 3, [0]],
                                    [10**30] * PIXELS])
def test_non_numbers_refused(values):
    with pytest.raises(DigitlabError, match=r"expected numbers in 0\.\.255, 784 per image"):
        as_uint8_images(values, "x")


@pytest.mark.parametrize("n", [1, _PYTHON_CHECK_MAX // PIXELS + 1])  # the Python-number path and numpy's
def test_small_and_large_arrays_agree(n):
    rng = np.random.default_rng(0)
    floats = rng.uniform(0, 255, (n, PIXELS))
    floats[0, :4] = [0.5, 1.5, 2.5, 254.5]  # halves round to even, as np.rint
    out = as_uint8_images(floats, "x")
    assert out.dtype == np.uint8 and out.shape == (n, 28, 28)
    assert np.array_equal(out.reshape(n, -1), np.rint(floats).astype(np.uint8))
    assert list(out[0].ravel()[:4]) == [0, 2, 2, 254]
    for bad, message in [(np.nan, "found NaN or infinity"), (np.inf, "found NaN or infinity"),
                         (255.4, "found 255.4"), (-0.4, "found -0.4"), (256, "found 256")]:
        broken = floats.copy()
        broken[-1, -1] = bad
        with pytest.raises(DigitlabError, match=message):
            as_uint8_images(broken, "x")


@pytest.mark.parametrize("n", [1, _PYTHON_CHECK_MAX // PIXELS + 1])
def test_floats_within_0_1_are_read_as_scaled_to_it(n):
    """Floats all within [0, 1] (a model's input scale) are multiplied by 255 on both paths; integers
    0/1 and floats that go past 1 are read as they are."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    assert np.array_equal(as_uint8_images(images.astype(np.float32) / 255, "x"), images)
    assert np.array_equal(as_uint8_images(images / 255.0, "x"), images)
    zeros_ones = (images > 127).astype(np.int64)
    assert np.array_equal(as_uint8_images(zeros_ones, "x"), zeros_ones)  # integers: 0..255 as given
    past_one = images.astype(np.float64) / 255
    past_one[0, 0, 0] = 1.5
    assert as_uint8_images(past_one, "x").max() == 2  # not the [0, 1] scale: read as 0..255, rounded


def test_every_entry_point_gives_the_same_pixels(tiny_run, tmp_path):
    """Python API, `digitlab predict` on a .npy file and the server's JSON: one validator, one answer."""
    from fastapi.testclient import TestClient

    from digitlab.inference import load_predictor
    from digitlab.predict import read_inputs
    from digitlab.serve.app import create_app

    image = np.random.default_rng(1).uniform(0, 255, (28, 28))
    predictor = load_predictor(tiny_run, precision="fp32")
    api = predictor.predict_proba(image[None])
    np.save(tmp_path / "one.npy", image[None])
    batches, errors, _ = read_inputs([tmp_path / "one.npy"])
    assert not errors
    from_file = batches[0].images
    assert np.array_equal(from_file[0], as_uint8_images(image, "x")[0])
    with TestClient(create_app(predictor)) as client:
        served = client.post("/v1/predict", json={"pixels": image.ravel().tolist()}).json()
        refused = client.post("/v1/predict", json={"pixels": [300] + [0] * 783})
    assert served["probabilities"] == pytest.approx(api[0].tolist(), abs=1e-5)
    # the same image scaled to [0, 1]: the same answer from all three
    unit = np.rint(image) / 255
    np.save(tmp_path / "unit.npy", unit[None])
    batches, errors, notes = read_inputs([tmp_path / "unit.npy"])
    assert not errors and notes == [f"{tmp_path / 'unit.npy'}: float values all within [0, 1], read as scaled "
                                    "to [0, 1] (multiplied by 255)"]
    assert np.array_equal(batches[0].images[0], np.rint(image).astype(np.uint8))
    with TestClient(create_app(predictor)) as client:
        served_unit = client.post("/v1/predict", json={"pixels": unit.ravel().tolist()}).json()
    assert served_unit["probabilities"] == pytest.approx(predictor.predict_proba(unit[None])[0].tolist(), abs=1e-5)
    assert served_unit["probabilities"] == pytest.approx(served["probabilities"], abs=1e-5)
    assert refused.status_code == 422 and refused.json()["detail"] == "pixels: values must lie in 0..255; found 300"
    with pytest.raises(DigitlabError, match=r"images: values must lie in 0\.\.255; found 300"):
        predictor.predict_proba(np.array([[300] + [0] * 783]))
