"""Tests of the digits classifier and the digits-FID / KID / accuracy built on it."""

import numpy as np
import pytest

from ddpm_jax.data import digits_arrays
from ddpm_jax.evaluation import digits_classifier


@pytest.fixture(scope="module")
def classifier():
    return digits_classifier.train_digits_classifier(seed=0)


def test_classifier_is_accurate_on_the_test_split(classifier):
    images, labels = digits_arrays("test")
    assert classifier.accuracy(images, labels) >= 0.95


def test_outputs_are_consistent(classifier):
    images, _ = digits_arrays("test")
    images = images[:37]
    probs = classifier.predict_proba(images)
    features = classifier.features(images)
    assert probs.shape == (37, 10) and features.shape == (37, digits_classifier.NUM_FEATURES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(classifier.predict(images), probs.argmax(axis=1))
    assert np.all(features >= 0)  # post-ReLU
    # Results do not depend on how the images are batched.
    np.testing.assert_allclose(classifier.features(images[5:9]), features[5:9], rtol=1e-5)


def test_training_is_deterministic():
    images, _ = digits_arrays("test")
    first, second, other = (
        digits_classifier.train_digits_classifier(seed=s, epochs=1) for s in (3, 3, 4)
    )
    np.testing.assert_array_equal(first.features(images[:50]), second.features(images[:50]))
    assert not np.allclose(first.features(images[:50]), other.features(images[:50]))


def test_digits_fid_orders_real_digits_before_degraded_ones(classifier):
    test_images, test_labels = digits_arrays("test")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, test_images.shape, dtype=np.uint8)
    train_images, train_labels = digits_arrays("train")
    only_ones = train_images[train_labels == 1]
    kwargs = dict(kid_num_subsets=10)
    real = digits_classifier.digits_metrics(classifier, test_images, test_labels, **kwargs)
    noisy = digits_classifier.digits_metrics(classifier, noise, **kwargs)
    collapsed = digits_classifier.digits_metrics(classifier, only_ones, **kwargs)
    assert real["accuracy"] >= 0.95
    assert "accuracy" not in noisy
    assert real["fid"] < 0.05 * noisy["fid"]
    assert real["fid"] < 0.05 * collapsed["fid"]  # one class only: mode collapse is penalised
    assert real["kid_mean"] < 0.05 * min(noisy["kid_mean"], collapsed["kid_mean"])


def test_inputs_are_validated(classifier):
    with pytest.raises(ValueError, match="uint8 \\[N, 8, 8, 1\\]"):
        classifier.features(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="uint8 \\[N, 8, 8, 1\\]"):
        classifier.predict(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="epochs"):
        digits_classifier.train_digits_classifier(epochs=0)
