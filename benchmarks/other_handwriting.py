"""Accuracy on handwriting that is not MNIST's: scikit-learn's bundled digits, or digits typed in
handwriting fonts (no download either way).

    PYTHONPATH=src python benchmarks/other_handwriting.py RUN_DIR [RUN_DIR ...] [--tta] [--json F]
    PYTHONPATH=src python benchmarks/other_handwriting.py RUN_DIR ... --set fonts [--fonts GLOB ...]

The set is the test part of UCI's "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak,
1998): 1,797 digits written by 13 people on NIST forms in Turkey, none of whom wrote MNIST, so
European-style 1s (with a long up-stroke) and 7s occur. Each digit is an 8x8 grid of ink counts
(0..16) from a 32x32 bitmap; it goes through the same MNIST-style preprocessing as a PNG given to
`digitlab predict` (crop to the ink, longer side to 20 px, centre of mass to the centre), so the
network sees a blurred, low-resolution digit, as from a small photo.

Thirteen writers make a small sample of styles: use this as a check of how a recipe carries over,
not to tune one (a recipe chosen here would be fitted to these 13 hands).
`--set fonts` is a different kind of sample: each digit of some 30 handwriting fonts (Debian's
fonts-* packages listed in FONT_PACKAGES; install them first), typed large, then redrawn VARIANTS
times with a random slant, rotation, width and pen thickness, and made MNIST-style the same way.
Fonts are not handwriting (one glyph per digit and font), but they carry styles MNIST's American
writers rarely use: 1s with a long flag, crossed 7s, open 4s, a looped 2. It is a validation source,
so it may be used to choose a recipe; the UCI set stays a check that nothing was chosen on.

Prints per run: accuracy with its 95% Wilson interval, recall of each digit, how many predictions
are flagged uncertain (digitlab.abstain), how many of the mistakes are among them, and the accuracy
of the rest; `--tta` adds test-time augmentation.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from digitlab.abstain import abstain_reasons, min_confidence
from digitlab.data.preprocess import mnist_style
from digitlab.errors import DigitlabError
from digitlab.evaluate import evaluate_predictions, wilson_interval
from digitlab.inference import load_predictor, predict_proba


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (1797, 28, 28) MNIST-style images and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("error: this benchmark reads scikit-learn's bundled digits: pip install scikit-learn")
    digits = load_digits()
    counts = np.asarray(digits.images)  # (N, 8, 8) ink counts 0..16, ink high
    grey = np.rint(counts / 16.0 * 255.0).astype(np.uint8)
    images = np.stack([mnist_style(g, name=f"digit {i}") for i, g in enumerate(grey)])
    return images, np.asarray(digits.target, dtype=np.int64)


# Debian packages of handwriting fonts and the files used from them (a font of outlined or swash digits is left out)
FONT_PACKAGES = (
    "fonts-bwht fonts-comic-neue fonts-dancingscript fonts-havana fonts-kaushanscript fonts-lobster fonts-breip "
    "fonts-ecolier-court fonts-dkg-handwriting fonts-humor-sans fonts-klee fonts-kristi fonts-leckerli-one "
    "fonts-rufscript fonts-sjfonts fonts-yusei-magic"
)
FONT_GLOBS = (
    "/usr/share/fonts/opentype/bwht/*.otf", "/usr/share/fonts/opentype/comic-neue/*.otf",
    "/usr/share/fonts/opentype/dancingscript/*.otf", "/usr/share/fonts/opentype/havana/*.otf",
    "/usr/share/fonts/opentype/kaushanscript/*.otf", "/usr/share/fonts/opentype/lobster/*.otf",
    "/usr/share/fonts/truetype/breip/*.ttf", "/usr/share/fonts/truetype/ecolier-court/*.ttf",
    "/usr/share/fonts/truetype/fifthhorseman/*.ttf", "/usr/share/fonts/truetype/humor-sans/*.ttf",
    "/usr/share/fonts/truetype/klee/*.ttf", "/usr/share/fonts/truetype/kristi/*.ttf",
    "/usr/share/fonts/truetype/leckerli-one/*.ttf", "/usr/share/fonts/truetype/rufscript/*.ttf",
    "/usr/share/fonts/truetype/sjfonts/*.ttf", "/usr/share/fonts/truetype/yusei-magic/*.ttf",
)
VARIANTS = 8  # redrawings of each glyph
SIZE = 112  # font size in pixels of the first drawing


def typed_digit(font: ImageFont.FreeTypeFont, digit: int, rng: np.random.Generator) -> np.ndarray:
    """One digit typed dark on white, slanted, rotated, narrowed or widened and thickened at random."""
    canvas = Image.new("L", (3 * SIZE, 3 * SIZE), 255)
    thickness = int(rng.integers(0, 5))  # pen width added around the glyph's outline, pixels
    ImageDraw.Draw(canvas).text((SIZE, SIZE), str(digit), font=font, fill=0, stroke_width=thickness, stroke_fill=0)
    shear, width = rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.15)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1 / width, shear, 0, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR, fillcolor=255)
    canvas = canvas.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, fillcolor=255)
    return np.asarray(canvas)


def font_digits(globs: list[str], variants: int = VARIANTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 (N, 28, 28) MNIST-style images typed in every font file the globs match, their labels,
    and the font files used. Exits with the packages to install when no font is found."""
    files = sorted({f for g in globs for f in glob.glob(g)})
    if not files:
        sys.exit(f"error: no font file matches {' '.join(globs)}; install them: apt-get install {FONT_PACKAGES}")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for path in files:
        font = ImageFont.truetype(path, SIZE)
        for digit in range(10):
            for v in range(variants):
                typed = typed_digit(font, digit, rng)
                images.append(mnist_style(typed, name=f"{Path(path).name} digit {digit} #{v}"))
                labels.append(digit)
    return np.stack(images), np.asarray(labels, dtype=np.int64), files


@dataclass
class Score:
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson
    recall: list[float]  # per digit 0..9
    uncertain: float  # share of predictions flagged (digitlab.abstain, the run's calibrated threshold)
    accuracy_of_rest: float
    errors: int
    errors_flagged: int  # of `errors`, how many were flagged uncertain
    confusions: dict[str, int]  # the most frequent "true->predicted"


def score(run: Path, images: np.ndarray, labels: np.ndarray, tta: bool) -> Score:
    predictor = load_predictor(run, precision="fp32")
    probs = predict_proba(predictor, images, tta=tta)
    result = evaluate_predictions(probs, labels)
    correct = probs.argmax(1) == labels
    flagged = np.array([r is not None for r in abstain_reasons(images, probs, min_confidence(predictor.meta))])
    mistakes = result.confusion * (1 - np.eye(10, dtype=np.int64))
    top = np.argsort(mistakes, axis=None, kind="stable")[::-1][:3]
    return Score(
        accuracy=result.accuracy,
        interval=wilson_interval(result.correct, result.total),
        recall=[c.recall for c in result.per_class],
        uncertain=float(flagged.mean()),
        accuracy_of_rest=float(correct[~flagged].mean()) if (~flagged).any() else float("nan"),
        errors=result.errors,
        errors_flagged=int((~correct & flagged).sum()),
        confusions={f"{i // 10}->{i % 10}": int(mistakes.flat[i]) for i in top if mistakes.flat[i] > 0},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run or ensemble folders")
    parser.add_argument("--tta", action="store_true", help="also score with test-time augmentation")
    parser.add_argument("--set", choices=("uci", "fonts"), default="uci",
                        help="uci: scikit-learn's UCI digits (13 writers; default); fonts: handwriting fonts")
    parser.add_argument("--fonts", nargs="+", default=list(FONT_GLOBS), metavar="GLOB",
                        help="font files for --set fonts (default: the Debian packages in FONT_PACKAGES)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the font set's redrawing")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = parser.parse_args()

    if args.set == "fonts":
        images, labels, files = font_digits(args.fonts, seed=args.seed)
        title = f"digits typed in {len(files)} handwriting fonts, {VARIANTS} redrawings each, {len(labels)} images"
    else:
        images, labels = uci_digits()
        title = f"UCI handwritten digits (scikit-learn), {len(labels)} images, 13 writers"
    results: dict[str, Score] = {}
    try:
        for run in args.runs:
            for tta in (False, True) if args.tta else (False,):
                results[f"{run}{' tta' if tta else ''}"] = score(run, images, labels, tta)
    except DigitlabError as exc:
        sys.exit(f"error: {exc}")

    print(title)
    print("| run | accuracy [95%] | recall 0-9 (%) | uncertain | errors flagged | acc. of the rest | top confusions |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, r in results.items():
        low, high = r.interval
        recall = " ".join(f"{100 * x:.0f}" for x in r.recall)
        confusions = ", ".join(f"{k} x{v}" for k, v in r.confusions.items())
        print(f"| {name} | {100 * r.accuracy:.2f}% [{100 * low:.1f}-{100 * high:.1f}] | {recall} "
              f"| {100 * r.uncertain:.1f}% | {r.errors_flagged} of {r.errors} | {100 * r.accuracy_of_rest:.2f}% "
              f"| {confusions} |")
    if args.json:
        args.json.write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
