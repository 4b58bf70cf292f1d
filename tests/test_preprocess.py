"""MNIST-style preprocessing: size, polarity, 20 px box, centre of mass, blank and transparent input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from digitlab.data.preprocess import CENTRE, load_image_file, mnist_style
from digitlab.errors import DigitlabError

FONT = font_manager.findfont("DejaVu Sans")


def render_digit(digit: int, size: tuple[int, int] = (300, 200), at: tuple[int, int] = (40, 20),
                 ink=(20, 20, 90), paper=(255, 255, 255), font_size: int = 150,
                 mode: str = "RGB") -> Image.Image:
    """A printed digit, dark ink on light paper, off-centre on a large canvas."""
    img = Image.new(mode, size, paper)
    ImageDraw.Draw(img).text(at, str(digit), fill=ink, font=ImageFont.truetype(FONT, font_size))
    return img


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, col) in pixel-index coordinates (pixel i has its centre at i); MNIST puts it at (14, 14)."""
    w = image.astype(np.float64)
    rows, cols = np.indices(w.shape)
    return float((rows * w).sum() / w.sum()), float((cols * w).sum() / w.sum())


def bbox(image: np.ndarray, level: int = 1) -> tuple[int, int]:
    ys, xs = np.nonzero(image >= level)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize("digit", [1, 4, 7, 8])
def test_printed_digit_becomes_mnist_like(digit: int) -> None:
    out = mnist_style(render_digit(digit))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    # light on dark: the border is black, the strokes reach full white
    border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert border.max() == 0 and out.max() == 255
    # the bounding box of the ink is 20 px on its longer side (anti-aliased edge pixels included,
    # so allow one pixel of spill from the resampling filter)
    assert max(bbox(out, level=30)) in (20, 21)
    row, col = centre_of_mass(out)
    assert abs(row - CENTRE) <= 0.6 and abs(col - CENTRE) <= 0.6  # whole-pixel shift: within 0.5 + rounding


def test_same_digit_anywhere_gives_nearly_the_same_result() -> None:
    a = mnist_style(render_digit(3, at=(10, 10)))
    b = mnist_style(render_digit(3, size=(500, 400), at=(300, 150), ink=(0, 0, 0), paper=(230, 230, 220)))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 12  # same shape, same place


def test_light_on_dark_input_is_not_inverted() -> None:
    dark = render_digit(5, ink=(255, 255, 255), paper=(0, 0, 0))
    light = render_digit(5)
    np.testing.assert_allclose(mnist_style(dark).astype(int), mnist_style(light).astype(int), atol=40)
    assert mnist_style(dark)[0, 0] == 0


def test_array_inputs() -> None:
    img = render_digit(2)
    from_pil = mnist_style(img)
    assert np.array_equal(mnist_style(np.asarray(img)), from_pil)  # (H, W, 3) uint8
    grey = np.asarray(img.convert("L"))
    assert np.array_equal(mnist_style(grey), from_pil)
    assert np.array_equal(mnist_style(grey.astype(np.float32) / 255), from_pil)


def test_mnist_digits_pass_through_almost_unchanged(mnist_test) -> None:
    # MNIST digits already are 20 px boxes centred by mass: preprocessing must be (nearly) a no-op
    for digit in mnist_test.images[:50]:
        out = mnist_style(digit)
        assert np.corrcoef(out.ravel().astype(float), digit.ravel().astype(float))[0, 1] > 0.98


def test_faint_noise_does_not_widen_the_box() -> None:
    img = np.asarray(render_digit(1).convert("L")).copy()
    img[5, 5] = 235  # a speck of dust far from the digit, faint against white paper
    clean = mnist_style(np.asarray(render_digit(1).convert("L")))
    assert np.array_equal(mnist_style(img), clean)


@pytest.mark.parametrize("value", [0, 255, 128])
def test_blank_image_is_an_error(value: int) -> None:
    with pytest.raises(DigitlabError, match="no ink found"):
        mnist_style(Image.new("L", (64, 64), value))


def test_transparent_png(tmp_path: Path) -> None:
    img = render_digit(6, ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA")  # black ink, clear paper
    path = tmp_path / "six.png"
    img.save(path)
    out = load_image_file(path)
    opaque = mnist_style(render_digit(6, ink=(0, 0, 0)))
    assert np.abs(out.astype(int) - opaque.astype(int)).max() <= 2
    assert out[0, 0] == 0 and out.max() == 255


def test_light_ink_on_transparent_background(tmp_path: Path) -> None:
    # a drawing canvas exporting white strokes on a clear background: invisible if put on white
    img = render_digit(6, ink=(255, 255, 255, 255), paper=(255, 255, 255, 0), mode="RGBA")
    img.save(tmp_path / "white6.png")
    expected = mnist_style(render_digit(6, ink=(0, 0, 0)))
    for out in (load_image_file(tmp_path / "white6.png"), mnist_style(img), mnist_style(np.asarray(img))):
        assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_of_a_phone_photo_is_applied(tmp_path: Path, fmt: str) -> None:
    upright = render_digit(7)
    # A phone held sideways stores the sensor's pixels turned a quarter, plus orientation
    # tag 6 ("rotate 90 degrees clockwise to display").
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"seven.{fmt.lower()}"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format=fmt, exif=exif, quality=95)
    expected = mnist_style(upright)
    out = load_image_file(path)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 3
    sideways = mnist_style(Image.open(path))  # what reading the raw pixels would give
    assert np.abs(sideways.astype(int) - expected.astype(int)).mean() > 20


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(DigitlabError, match=r"junk\.png: not a readable image"):
        load_image_file(junk)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    with pytest.raises(DigitlabError, match=r"blank\.png: no ink found \(blank image\)"):
        mnist_style(Image.open(blank), name=str(blank))
    # a blank file is no error to predict: the all-zero image, which digitlab.abstain flags
    assert not load_image_file(blank).any()


def test_bad_arrays() -> None:
    with pytest.raises(DigitlabError, match="shape"):
        mnist_style(np.zeros((2, 28, 28)))
    with pytest.raises(DigitlabError, match="NaN"):
        mnist_style(np.full((28, 28), np.nan))
