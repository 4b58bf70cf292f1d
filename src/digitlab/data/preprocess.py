"""Make a photo or drawing of one digit look like an MNIST digit, the way MNIST was made.

LeCun et al.: ink bounding box scaled to 20 px (aspect kept, anti-aliased), then placed in
a 28x28 field so that its centre of mass sits at the centre. Used by predict, serve and the
`images:DIR` data source, so that a folder evaluated or trained on is seen as predict sees it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from digitlab.data.dataset import DigitData
from digitlab.data.images import IMAGE_SUFFIXES, flatten_grey, has_alpha, read_image
from digitlab.errors import DigitlabError, missing

log = logging.getLogger(__name__)

FIELD = 28  # output side, pixels
BOX = 20  # the longer side of the digit's bounding box after scaling, pixels (MNIST: 20)
# Where the centre of mass goes, in pixel-index coordinates (pixel i has its centre at i,
# i = 0..27). MNIST's own digits have their centre of mass at 14.0 on average (60,000
# training images: mean 13.996 row, 14.007 column; 5-95% range 13.55-14.45), i.e. at
# FIELD / 2 counted in indices, half a pixel past the geometric centre 13.5. We match the
# data. The digit moves by whole pixels (as MNIST's did), so the result lies within half a
# pixel of (14, 14) before rounding to uint8.
CENTRE = FIELD / 2
BBOX_FRACTION = 0.15  # pixels fainter than this share of the strongest ink are noise for the bbox
FLOOR_FRACTION = 0.05  # ...and fainter than this are paper texture / JPEG noise, set to 0
MIN_CONTRAST = 24 / 255  # less ink-to-background contrast than this counts as a blank image


class BlankImageError(DigitlabError):
    """The image holds no ink (callers that answer "too little ink" instead of failing catch it)."""


def _has_alpha(image: Image.Image | np.ndarray) -> bool:
    if isinstance(image, Image.Image):
        return has_alpha(image)
    return np.ndim(image) == 3 and np.shape(image)[2] == 4


def _grey(image: Image.Image | np.ndarray, matte: int = 255) -> np.ndarray:
    """Float grey (H, W) in [0, 1]; transparency composited onto `matte` (see data.images.flatten_grey)."""
    if isinstance(image, Image.Image):
        return np.asarray(flatten_grey(image, matte), dtype=np.float32) / 255.0
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if not np.issubdtype(array.dtype, np.number):
        raise DigitlabError(f"expected a numeric image array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (3, 4):  # (H, W, RGB[A])
        mode = "RGBA" if array.shape[2] == 4 else "RGB"
        return _grey(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode), matte)
    if array.ndim != 2:
        raise DigitlabError(f"expected a grey (H, W) or colour (H, W, 3|4) image, got shape {array.shape}")
    if array.size == 0 or not np.isfinite(array).all():
        raise DigitlabError(f"image of shape {array.shape} is empty or holds NaN/inf values")
    array = array.astype(np.float32)
    # Integer arrays are 0..255; float arrays whose values stay within [0, 1] are taken as 0..1.
    if np.issubdtype(np.asarray(image).dtype, np.floating) and array.max() <= 1.0:
        return np.clip(array, 0.0, 1.0)
    return np.clip(array, 0.0, 255.0) / 255.0


def _ink(grey: np.ndarray, name: str) -> np.ndarray:
    """Ink strength in [0, 1] on a 0 background: inverted when the background is lighter than the ink."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    # Which way does the ink deviate from the background? Dark ink on paper (any paper grey)
    # deviates downwards; MNIST-style light strokes on black deviate upwards.
    darker, lighter = background - float(grey.min()), float(grey.max()) - background
    ink = background - grey if darker > lighter else grey - background
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise BlankImageError(f"{name}: no ink found (blank image)")
    ink /= peak  # a grey pencil line becomes as strong as MNIST's pen strokes
    ink[ink < FLOOR_FRACTION] = 0.0
    return ink


def _scale_to_box(patch: np.ndarray) -> np.ndarray:
    """Longer side to BOX pixels, aspect kept.

    BOX (area average, MNIST's anti-aliasing) when shrinking; LANCZOS when growing.
    """
    h, w = patch.shape
    factor = BOX / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))  # PIL wants (width, height)
    resample = Image.Resampling.BOX if factor <= 1 else Image.Resampling.LANCZOS
    scaled = np.asarray(Image.fromarray(patch.astype(np.float32)).resize(size, resample), dtype=np.float32)
    scaled = np.clip(scaled, 0.0, None)  # LANCZOS rings below zero next to strokes
    return scaled / max(float(scaled.max()), 1e-6)


def _place_by_centre_of_mass(patch: np.ndarray) -> np.ndarray:
    """Paste into a FIELD x FIELD canvas so the centre of mass moves to CENTRE (whole-pixel shift)."""
    h, w = patch.shape
    total = float(patch.sum())
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    com_row = float((patch.sum(axis=1) * rows).sum() / total)
    com_col = float((patch.sum(axis=0) * cols).sum() / total)
    # floor(x + 0.5): round half up, the same way for every input (np.round rounds half to even)
    top = int(np.floor(CENTRE - com_row + 0.5))
    left = int(np.floor(CENTRE - com_col + 0.5))
    # A very lopsided digit would be cut at the edge; keep all the ink instead of the exact centre.
    top = min(max(top, 0), FIELD - h)
    left = min(max(left, 0), FIELD - w)
    canvas = np.zeros((FIELD, FIELD), dtype=np.float32)
    canvas[top : top + h, left : left + w] = patch
    return canvas


def mnist_style(image: Image.Image | np.ndarray, *, name: str = "image") -> np.ndarray:
    """One digit (PIL image or array, any size, either polarity) -> uint8 (28, 28), light ink on black.

    Steps: grey (transparency onto white) -> ink on a zero background (inverted if the
    background is light) -> crop to the ink's bounding box (faint noise ignored) -> longer
    side to 20 px, anti-aliased -> centre of mass to the centre of the 28x28 field.
    `name` (a file name) prefixes error messages.
    """
    try:
        ink = _ink(_grey(image), name)
    except BlankImageError:
        if not _has_alpha(image):
            raise
        # white (light) ink on a transparent background vanishes on white: try a black matte
        ink = _ink(_grey(image, matte=0), name)
    strong = np.argwhere(ink >= BBOX_FRACTION)
    (r0, c0), (r1, c1) = strong.min(axis=0), strong.max(axis=0) + 1
    patch = _scale_to_box(ink[r0:r1, c0:c1])
    canvas = _place_by_centre_of_mass(patch)
    log.debug("%s: ink box %dx%d px -> %dx%d", name, r1 - r0, c1 - c0, *patch.shape)
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)


def mnist_style_or_blank(image: Image.Image | np.ndarray, *, name: str = "image") -> np.ndarray:
    """`mnist_style`, except that an image without ink becomes the all-zero 28x28 image.

    A blank upload or file is then answered as the blank JSON image is: the model's guess,
    flagged uncertain with "too little ink" (digitlab.abstain), not an error.
    """
    try:
        return mnist_style(image, name=name)
    except BlankImageError:
        return np.zeros((FIELD, FIELD), np.uint8)


def load_image_file(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG/... file of one digit and return it MNIST-style (uint8 (28, 28)); blank: zeros."""
    path = Path(path)
    # alpha kept: mnist_style retries light-on-clear ink on a black matte
    return mnist_style_or_blank(read_image(path), name=str(path))


def load_image_folder(directory: str | Path) -> DigitData:
    """The `images:DIR` source: image files in class sub-folders `0/`..`9/`, each read by
    `load_image_file`, so `evaluate --data images:DIR` scores what `predict` answers for those files.
    MNIST's own digits, already made this way, pass nearly unchanged (3,000 of MNIST test: 0.26 grey
    levels apart on average, 1% of pixels by more than 2; three presets' accuracy moved by at most one image)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise missing(directory, "a folder of images in class sub-folders 0/ .. 9/", folder=True)
    images, labels = [], []
    for label in range(10):
        class_dir = directory / str(label)
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_image_file(path))
                labels.append(label)
    if not images:
        raise DigitlabError(
            f"{directory}: no images found; expected PNG/JPEG files in class sub-folders 0/ .. 9/"
        )
    return DigitData(np.stack(images), np.array(labels, dtype=np.int64), f"images:{directory}")
