"""``glyphs``: a synthetic, offline pretraining source of printed letters in digits' 8x8 format.

Fine-tuning needs a pretrained backbone, and offline there is no ImageNet. This dataset is the
project's stand-in: letters rendered in the fonts matplotlib ships (DejaVu Sans / Serif / Mono,
STIX, Computer Modern; regular, bold, italic), randomly rotated, sheared, thickened, scaled and
shifted, then reduced exactly the way the UCI optdigits images behind scikit-learn's ``digits``
were made: a binary 32x32 bitmap whose non-overlapping 4x4 blocks are counted, giving 8x8
images with intensities 0..16. A backbone trained on it learns strokes, curves and junctions at
digits' scale and intensity statistics, without ever seeing a digit: no digit glyph is rendered,
and nothing of the digits dataset (images or labels) is read.

Classes are the 26 capitals plus the 16 small letters whose shape differs from their capital
(``c``/``C``, ``o``/``O``, ... are one shape once size-normalised, so the small one is left out):
42 classes. Generation is deterministic: same ``per_class`` and ``seed``, same images.
"""

from __future__ import annotations

import string
from pathlib import Path

import matplotlib
import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)  # fmt: skip
# Small letters whose size-normalised shape is not their capital's.
DISTINCT_SMALL = "abdefghijlmnqrty"
CLASSES = tuple(string.ascii_uppercase) + tuple(DISTINCT_SMALL)
CANVAS = 96  # render size: large enough that rotation and shear do not clip a glyph
BITMAP = 32  # optdigits' bitmap size, counted in 4x4 blocks down to 8x8


def font_paths() -> list[Path]:
    """The matplotlib-bundled font files the glyphs are drawn in."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / name for name in FONT_FILES]


def render_glyph(char: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
    """One randomly deformed glyph as an 8x8 uint8 array with values 0..16 (optdigits' format)."""
    im = PILImage.new("L", (CANVAS, CANVAS), 0)
    centre = CANVAS // 2
    ImageDraw.Draw(im).text(
        (centre, centre), char, fill=255, font=font, anchor="mm",
        stroke_width=int(rng.integers(0, 4)), stroke_fill=255,
    )  # fmt: skip
    im = im.rotate(rng.uniform(-12.0, 12.0), resample=PILImage.Resampling.BILINEAR)
    shear = rng.uniform(-0.25, 0.25)
    im = im.transform(
        im.size,
        PILImage.Transform.AFFINE,
        (1, shear, -shear * centre, 0, 1, 0),
        PILImage.Resampling.BILINEAR,
    )
    ys, xs = np.nonzero(np.asarray(im) > 127)
    glyph = im.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    # optdigits normalises each character to the bitmap; the jitter keeps it from being exact.
    scale = rng.uniform(26.0, 32.0) / max(glyph.size)
    w, h = (max(1, round(side * scale)) for side in glyph.size)
    glyph = glyph.resize((w, h), PILImage.Resampling.BILINEAR)
    bitmap = PILImage.new("L", (BITMAP, BITMAP), 0)
    x = int(np.clip((BITMAP - w) // 2 + rng.integers(-1, 2), 0, BITMAP - w))
    y = int(np.clip((BITMAP - h) // 2 + rng.integers(-1, 2), 0, BITMAP - h))
    bitmap.paste(glyph, (x, y))
    on = (np.asarray(bitmap) > 127).astype(np.uint8)
    return on.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.uint8)


def glyphs_dataset(per_class: int = 300, seed: int = 0) -> Dataset:
    """``per_class`` rendered images of each of the 42 letter classes, as Image + ClassLabel."""
    rng = np.random.default_rng(seed)
    fonts = [ImageFont.truetype(str(p), 48) for p in font_paths()]
    images, labels = [], []
    for _ in range(per_class):
        for label, char in enumerate(CLASSES):
            counts = render_glyph(char, fonts[rng.integers(len(fonts))], rng)
            # 0..16 block counts -> 0..255 grey levels, as digits_dataset() maps sklearn's images
            # (in int: 16 * 16 overflows uint8 to 0, turning every fully inked block black)
            grey = np.clip(counts.astype(np.int32) * 16, 0, 255).astype(np.uint8)
            images.append(PILImage.fromarray(grey, "L"))
            labels.append(label)
    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASSES))})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)
