"""The one check of what a model reads: 28x28 images of numbers in 0..255 -> uint8 (N, 28, 28).

Used by the Python API (`Predictor`, the ONNX predictor), `digitlab predict` on .npy/.npz files
and the server's JSON pixels, so that all of them accept and refuse the same arrays with the
same words. Free of torch, so the server can import it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from digitlab.errors import DigitlabError

PIXELS = 28 * 28
# Up to this many values the checks run on Python numbers: numpy's reductions release the
# interpreter lock and, in the server, then queue to get it back behind the inference thread,
# which cost more than the checks themselves (one JSON image is checked on the event loop).
_PYTHON_CHECK_MAX = 4 * PIXELS


def as_uint8_images(values: Any, where: str, *, one: bool = False) -> np.ndarray:
    """uint8 (N, 28, 28) from (N, 28, 28), (N, 784), (28, 28) or (784,) numbers in 0..255.

    Floats are rounded half to even (as `np.rint`). Floats that all lie within [0, 1] are taken as
    scaled to [0, 1], as a model's input often is, and multiplied by 255 first: in 0..255 such an
    image would be blank (at most 1/255 of full ink), so no real image is misread by the rule.
    `one=True` accepts only a single image and returns (28, 28). Anything else is a DigitlabError
    that starts with `where`.
    """
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError):  # ragged nesting, integers too big for any dtype
        array = None
    if array is None or array.dtype.kind not in "iuf":  # bool, strings, None, objects: not pixel values
        raise DigitlabError(f"{where}: expected numbers in 0..255, {PIXELS} per image (28x28 row by row)")
    if one:
        if array.shape not in ((PIXELS,), (28, 28)):
            raise DigitlabError(f"{where}: expected {PIXELS} numbers (28x28), got shape {list(array.shape)}")
    elif array.shape in ((PIXELS,), (28, 28)):
        array = array[None]
    if array.ndim == 2 and array.shape[1] == PIXELS:
        array = array.reshape(-1, 28, 28)
    if not one and (array.ndim != 3 or array.shape[1:] != (28, 28)):
        per_image = int(np.prod(array.shape[1:])) if array.ndim >= 2 else array.size
        raise DigitlabError(f"{where}: got shape {list(array.shape)} ({per_image} pixels per image), expected "
                            f"(N, 28, 28) or (N, {PIXELS})")
    shape = (28, 28) if one else array.shape
    if array.dtype == np.uint8:
        return array.reshape(shape)
    if array.size <= _PYTHON_CHECK_MAX:
        return _small_to_uint8(array.ravel().tolist(), array.dtype.kind == "f", where).reshape(shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DigitlabError(_NOT_FINITE.format(where=where))
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise DigitlabError(_OUT_OF_RANGE.format(where=where, value=low if low < 0 else high))
    if _unit_scaled(array.dtype.kind == "f", low, high):
        array = array.astype(np.float64) * 255
    return np.rint(array).astype(np.uint8).reshape(shape)


def unit_scaled(values: np.ndarray) -> bool:
    """Whether `as_uint8_images` reads these values as scaled to [0, 1] (floats, all within it)."""
    return values.dtype.kind == "f" and values.size > 0 and _unit_scaled(True, values.min(), values.max())


def _unit_scaled(floats: bool, low: Any, high: Any) -> bool:
    """The [0, 1] rule, on an image set's lowest and highest value (see `as_uint8_images`)."""
    return bool(floats and low >= 0 and high <= 1)


_NOT_FINITE = "{where}: values must be finite numbers in 0..255; found NaN or infinity"
_OUT_OF_RANGE = "{where}: values must lie in 0..255; found {value:g}"


def _small_to_uint8(flat: list[Any], floats: bool, where: str) -> np.ndarray:
    if floats and not all(map(math.isfinite, flat)):
        raise DigitlabError(_NOT_FINITE.format(where=where))
    if flat:
        low, high = min(flat), max(flat)
        if low < 0 or high > 255:
            raise DigitlabError(_OUT_OF_RANGE.format(where=where, value=low if low < 0 else high))
        if _unit_scaled(floats, low, high):
            flat = [v * 255 for v in flat]
    if floats:
        flat = [round(v) for v in flat]  # half to even, as np.rint
    return np.array(flat, dtype=np.uint8)
