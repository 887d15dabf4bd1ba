"""The synthetic ``glyphs`` pretraining source: digits' format, no digit, deterministic."""

import numpy as np

from flower_p2p.config import ExperimentConfig
from flower_p2p.data import digits_dataset, load_data
from flower_p2p.glyphs import CLASSES, font_paths, glyphs_dataset


def _pixels(ds):
    return np.stack([np.asarray(im) for im in ds["image"]])


def test_glyphs_are_letters_only_with_every_class_equally_often():
    ds = glyphs_dataset(per_class=3, seed=1)
    names = ds.features["label"].names
    assert names == list(CLASSES) and len(names) == 42
    assert not any(name.isdigit() for name in names)  # the backbone never sees a digit
    assert np.bincount(ds["label"], minlength=42).tolist() == [3] * 42
    assert all(path.exists() for path in font_paths())


def test_glyphs_have_the_digits_format():
    glyphs, digits = _pixels(glyphs_dataset(per_class=4)), _pixels(digits_dataset())
    assert glyphs.shape[1:] == digits.shape[1:] == (8, 8)
    assert glyphs.dtype == digits.dtype == np.uint8
    # optdigits: counts of 0..16 set pixels per 4x4 block, scaled by 16 (256 clipped to 255)
    allowed = set(np.clip(np.arange(17) * 16, 0, 255).tolist())
    assert set(np.unique(glyphs).tolist()) <= allowed
    assert set(np.unique(digits).tolist()) <= allowed
    # Same ink statistics as the digits: fully inked blocks (255) are a large share of the ink
    # (a uint8 overflow of 16 * 16 once turned them all black), and the mean grey level is close.
    for images in (glyphs, digits):
        assert (images[images > 0] == 255).mean() > 0.1
        assert 0.4 < (images > 0).mean() < 0.65
    assert abs(float(glyphs.mean()) - float(digits.mean())) < 15
    # Every glyph has ink, and is size-normalised: it reaches the 8x8 frame's top and bottom
    # rows or its left and right columns, as the digits do.
    assert (glyphs.reshape(len(glyphs), -1).max(axis=1) > 0).all()
    rows, cols = glyphs.any(axis=2), glyphs.any(axis=1)
    spans = np.maximum(rows.sum(axis=1), cols.sum(axis=1))
    assert (spans >= 7).all()


def test_glyphs_are_deterministic_per_seed_and_vary_within_a_class():
    a = _pixels(glyphs_dataset(per_class=2, seed=3))
    assert np.array_equal(a, _pixels(glyphs_dataset(per_class=2, seed=3)))
    c = _pixels(glyphs_dataset(per_class=2, seed=4))
    assert not np.array_equal(a, c)
    # two renderings of the same letter (random font, rotation, shear, stroke) differ
    assert (a[:42] != a[42:]).reshape(42, -1).any(axis=1).mean() > 0.9


def test_glyphs_is_a_dataset_name_with_a_fixed_test_split():
    cfg = ExperimentConfig(dataset="glyphs", partitioner="iid", num_nodes=2)
    bundle = load_data(cfg)
    assert bundle.num_classes == 42 and bundle.class_names[0] == "A"
    train = sum(len(p) for p in bundle.partitions)
    assert train + len(bundle.test) == 42 * 300
    assert np.bincount(bundle.test["label"], minlength=42).min() >= 14  # stratified 20 %
