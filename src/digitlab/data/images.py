"""Reading untrusted image files: size caps checked from the header, EXIF orientation, 16-bit and
transparency handled, every failure one DigitlabError naming the file.

`digitlab.data.preprocess` turns what these return into MNIST-style digits.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from digitlab.errors import DigitlabError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# Checked from the header before decoding: a 32 KB PNG can say 10000x10000 and decode to
# gigabytes. JPEGs (phone photos) larger than this are decoded at 1/2-1/8 scale instead.
MAX_IMAGE_PIXELS = 4096 * 4096
_AT_MOST = f"expected at most {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels (4096x4096)"


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as it should be viewed: phone cameras store the sensor's pixels and an EXIF
    orientation tag (rotate/mirror) instead of turning the photo itself."""
    if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


# Pillow's 16-bit grey modes (16-bit PNGs open as "I;16"; older Pillow and some PGM/TIFF
# files give 32-bit "I" holding the same 0..65535 values).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def scale_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit grey, 0..65535 scaled to 0..255 (Pillow's convert("L")
    clips instead, so a 20000-on-60000 digit would read as a blank white square)."""
    wide = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
    return Image.fromarray(np.rint(wide / 257).astype(np.uint8), "L")


def flatten_grey(img: Image.Image, matte: int = 255) -> Image.Image:
    """8-bit grey; a transparent background is composited onto `matte` (white keeps dark ink visible)."""
    if img.mode in WIDE_GREY_MODES:
        return scale_to_8bit(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (matte, matte, matte, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L")


def reduce_while_decoding(image: Image.Image, max_pixels: int) -> None:
    """Ask a JPEG decoder for 1/2, 1/4 or 1/8 scale, the least reduction that fits `max_pixels`.

    Pillow's draft() picks the largest reduction whose size is still at least the one asked for,
    so asking for width // d x height // d gives exactly 1/d; nothing happens for other formats.
    """
    width, height = image.size
    if image.format != "JPEG" or width * height <= max_pixels:
        return
    factor = next((d for d in (2, 4, 8) if (width // d) * (height // d) <= max_pixels), 8)
    image.draft(image.mode, (max(1, width // factor), max(1, height // factor)))


def read_image(path: Path) -> Image.Image:
    """Open and decode an image file upright (EXIF orientation applied), with a clear error if
    unreadable or over MAX_IMAGE_PIXELS. 16-bit grey and transparency are kept (flatten_grey
    needs them); other modes become "L" here, where a mode Pillow cannot convert (LAB, HSV)
    is still an error naming the file."""
    try:
        with warnings.catch_warnings():
            # MAX_IMAGE_PIXELS refuses those images below; PIL's own warning would only
            # print a traceback-like line on stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                reduce_while_decoding(img, MAX_IMAGE_PIXELS)  # a 48-megapixel phone photo decodes at 1/2 or 1/4
                if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                    raise DigitlabError(
                        f"{path}: image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), "
                        + _AT_MOST
                    )
                img.load()
                image = upright(img)
    except FileNotFoundError:
        raise DigitlabError(f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:  # not an OSError: PIL's guard against huge images
        raise DigitlabError(f"{path}: image too large ({exc}), {_AT_MOST}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports some damaged files as SyntaxError (a broken PNG chunk) or EOFError
        raise DigitlabError(f"{path}: not a readable image ({_why_unreadable(exc, path)})") from None
    if image.mode in WIDE_GREY_MODES:
        return image
    try:
        return image.convert("RGBA" if has_alpha(image) else "L")
    except ValueError:
        raise DigitlabError(f"{path}: Pillow cannot convert its {image.mode} colours to grey, "
                            "expected a grey, RGB or palette image") from None


def _why_unreadable(exc: BaseException, path: Path | str) -> str:
    """PIL's reason for refusing a file, short: the class, then its first line unless that only
    repeats the file's name ("cannot identify image file '...'": not a format Pillow reads)."""
    if isinstance(exc, UnidentifiedImageError):
        return f"{exc.__class__.__name__}: not an image format Pillow reads"
    first = (str(exc).splitlines() or [""])[0].strip()
    if not first or str(path) in first:
        return exc.__class__.__name__
    return f"{exc.__class__.__name__}: {first[:200]}"
