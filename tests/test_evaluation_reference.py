"""Tests of ddpm_jax.evaluation.reference: extractors, a split's images and cached statistics.

Known answers: the cached reference statistics equal the float64 mean and covariance (np.cov) of
the digits classifier's features of the training split; the digits extractor of a larger image
equals the extractor of that image resized to 8x8; a tfds split is read once, whole.
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddpm_jax import data, images
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import digits_classifier as digits_lib, metrics, reference as ref


@pytest.fixture(scope="module")
def classifier():
    return digits_lib.train_digits_classifier(seed=0, epochs=1)


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds mocked with 20 random examples per split, the datasets reported as prepared."""
    with tfds.testing.mock_data(num_examples=20):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        yield


def _train_batches():
    yield data.digits_arrays("train")


def test_reference_stats_cached_and_exact(classifier, tmp_path):
    extractor = ref.digits_extractor(classifier)
    path = ref.reference_path(
        "digits",
        split="train",
        image_shape=(8, 8, 1),
        extractor=extractor.name,
        cache_dir=str(tmp_path),
    )
    assert path == os.path.join(str(tmp_path), f"digits_8x8_train_{extractor.name}.npz")
    stats, cached = ref.reference_stats(extractor, _train_batches, path)
    assert not cached and os.path.exists(path)
    assert [p for p in os.listdir(tmp_path) if p != os.path.basename(path)] == []  # no temp file
    train_images, _ = data.digits_arrays("train")
    feats = np.asarray(classifier.features(train_images), np.float64)
    with np.load(path) as f:
        assert int(f["count"]) == 1437
        assert str(f["extractor"]) == extractor.name
        np.testing.assert_allclose(f["mu"], feats.mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(f["sigma"], np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)
        direct = metrics.RunningStats.init(feats.shape[1]).update(feats).mean_cov()
        np.testing.assert_allclose(f["sigma"], direct[1], rtol=1e-10, atol=1e-12)
        assert f["kid_features"].shape == (1437, digits_lib.NUM_FEATURES)

    # A second call loads the file: the data batches are never read again.
    def no_batches():
        raise AssertionError("reference statistics recomputed")

    again, cached = ref.reference_stats(extractor, no_batches, path)
    assert cached and again.count == 1437
    np.testing.assert_array_equal(again.cov, stats.cov)

    # Another classifier (another name) does not reuse the cache.
    other = ref.Extractor("other", 128, extractor.fn, True)
    _, cached = ref.reference_stats(other, _train_batches, path)
    assert not cached


def test_kid_features_are_a_fixed_subset_of_at_most_5000_rows(tmp_path):
    rows = ref.KID_REFERENCE_ROWS + 7
    feats = np.random.default_rng(0).standard_normal((rows, 2)).astype(np.float32)
    extractor = ref.Extractor("identity", 2, lambda x: (x, x), False)
    stats, _ = ref.reference_stats(
        extractor, lambda: iter([(feats, None)]), str(tmp_path / "r.npz")
    )
    assert stats.kid_features.shape == (ref.KID_REFERENCE_ROWS, 2) and stats.count == rows
    keep = np.sort(np.random.default_rng(0).choice(rows, ref.KID_REFERENCE_ROWS, False))
    np.testing.assert_array_equal(stats.kid_features, feats[keep])


def test_digits_extractor_accepts_images_of_any_size(classifier):
    extractor = ref.digits_extractor(classifier)
    x, _ = data.digits_arrays("test")
    x = x[:50]
    feats, probs = extractor.fn(x)
    np.testing.assert_array_equal(feats, classifier.features(x))
    np.testing.assert_array_equal(probs, classifier.predict_proba(x))
    for size in (16, 32):
        big = images.resize(x, (size, size))
        feats, probs = extractor.fn(big)
        assert feats.shape == (50, digits_lib.NUM_FEATURES) and probs.shape == (50, 10)
        small = images.resize(big, (8, 8))
        np.testing.assert_array_equal(feats, classifier.features(small))
        np.testing.assert_array_equal(probs, classifier.predict_proba(small))


def test_split_images_of_digits_at_a_size():
    (x, y), *rest = list(ref.split_images("digits", "test"))
    assert rest == [] and x.shape == (360, 8, 8, 1) and y.shape == (360,)
    (big, y16), *_ = list(ref.split_images("digits", "test", image_size=16))
    np.testing.assert_array_equal(big, images.resize(x, (16, 16)))
    np.testing.assert_array_equal(y16, y)
    (same, _), *_ = list(ref.split_images("digits", "test", image_size=(8, 8)))
    np.testing.assert_array_equal(same, x)


def test_reference_images_of_a_tfds_dataset_are_one_epoch(mock_tfds):
    """split_images reads one pass of the split (20 mocked examples, fewer than the reference
    batch), as uint8 images at the requested size with their labels."""
    batches = list(ref.split_images("cifar10", "train"))
    imgs = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert imgs.shape == (20, 32, 32, 3) and imgs.dtype == np.uint8
    assert labels.shape == (20,) and labels.min() >= 0 and labels.max() < 10
    small = np.concatenate([x for x, _ in ref.split_images("cifar10", "train", image_size=8)])
    np.testing.assert_array_equal(small, images.resize(imgs, (8, 8)))


def test_missing_inception_weights_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="inception_path="):
        ref.inception_extractor(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="inception_path="):  # a UsageError is a ValueError
        ref.inception_extractor(str(tmp_path / "missing.pth"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ref.default_cache_dir() == os.path.join(str(tmp_path), "ddpm_jax", "reference_stats")
    path = ref.reference_path("a/b", split="test", image_shape=(4, 6, 3), extractor="x")
    assert path == (
        os.path.join(str(tmp_path), "ddpm_jax", "reference_stats", "a_b_4x6_test_x.npz")
    )
