"""Tests of the metric math: streaming statistics, Fréchet distance, KID, Inception Score."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import metrics


def _random_stats(rng, dim, num_samples, scale=1.0, offset=0.0):
    """Mean and covariance (ddof=1) of `num_samples` correlated Gaussian vectors."""
    mix = rng.normal(size=(dim, dim))
    x = rng.normal(size=(num_samples, dim)) @ mix * scale + offset
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _fid_scipy(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance` (scipy.linalg.sqrtm), in float64."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# --- RunningStats ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_running_stats_equal_one_shot_stats_for_uneven_chunks(offset):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 6)) @ rng.normal(size=(6, 6)) + offset
    x = x.astype(np.float32)  # features arrive as float32; accumulation is float64
    stats = metrics.RunningStats.init(6)
    for lo, hi in itertools.pairwise([0, 1, 8, 8, 38, 39, 41, 100]):  # incl. sizes 1 and 0
        stats = stats.update(x[lo:hi])
    mu, sigma = stats.mean_cov()
    x64 = x.astype(np.float64)
    assert stats.count == 100
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x64.mean(axis=0), rtol=1e-12, atol=1e-12 * (1 + offset))
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)


def test_running_stats_merge_matches_sequential_updates():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(17, 4)), rng.normal(size=(30, 4)) + 3.0
    merged = metrics.RunningStats.init(4).update(a).merge(metrics.RunningStats.init(4).update(b))
    mu, sigma = merged.mean_cov()
    both = np.concatenate([a, b])
    np.testing.assert_allclose(mu, both.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(both, rowvar=False), rtol=1e-10)


def test_running_stats_validation():
    stats = metrics.RunningStats.init(3)
    with pytest.raises(ValueError, match="features must have shape"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.update(np.zeros((1, 3))).mean_cov()


def test_accumulate_stats_runs_features_fn_over_batches():
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(n, 2)) for n in (3, 5, 4)]
    stats = metrics.accumulate_stats(lambda b: 2.0 * b, batches, dim=2)
    mu, sigma = stats.mean_cov()
    both = 2.0 * np.concatenate(batches)
    np.testing.assert_allclose(mu, both.mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(both, rowvar=False))


# --- Fréchet distance -----------------------------------------------------------------------


def test_frechet_distance_matches_scipy_reference_full_rank():
    rng = np.random.default_rng(3)
    for dim in (2, 16, 64):
        mu1, sigma1 = _random_stats(rng, dim, 4 * dim)
        mu2, sigma2 = _random_stats(rng, dim, 4 * dim, scale=1.5, offset=0.3)
        ours = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
        ref = _fid_scipy(mu1, sigma1, mu2, sigma2)
        assert ours == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_matches_scipy_reference_rank_deficient():
    rng = np.random.default_rng(4)
    dim = 32
    mu1, sigma1 = _random_stats(rng, dim, 10)  # rank 9
    mu2, sigma2 = _random_stats(rng, dim, 20, offset=0.5)  # rank 19
    assert np.linalg.matrix_rank(sigma1) == 9
    ours = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    ref = _fid_scipy(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_closed_form_for_commuting_singular_covariances():
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: d² = |μ1 - μ2|² + Σ_i (√a_i - √b_i)², zeros allowed.
    rng = np.random.default_rng(5)
    dim = 12
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = rng.uniform(0.1, 4.0, dim)
    b = rng.uniform(0.1, 4.0, dim)
    a[:4] = 0.0
    b[2:7] = 0.0
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("num_samples", [500, 20])  # full rank, and rank 19 < dim
def test_frechet_distance_of_a_set_against_itself_is_zero(num_samples):
    rng = np.random.default_rng(6)
    mu, sigma = _random_stats(rng, 64, num_samples, scale=3.0, offset=10.0)
    scale = np.trace(sigma)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * scale


def test_frechet_distance_validation():
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


# --- KID ------------------------------------------------------------------------------------


def _mmd2_direct(x, y):
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³ by explicit double loops."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_direct_computation_on_all_samples():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(15, 5)), rng.normal(size=(15, 5)) + 0.7
    mean, std = metrics.kid(x, y, num_subsets=3, subset_size=15)
    # Every subset is the whole set in another order: the estimator is order-independent.
    assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_subsets_match_direct_computation():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(30, 4)), 1.2 * rng.normal(size=(25, 4))
    mean, std = metrics.kid(x, y, num_subsets=4, subset_size=10, seed=3)
    draw = np.random.default_rng(3)
    values = []
    for _ in range(4):
        xs = x[draw.choice(30, 10, replace=False)]
        ys = y[draw.choice(25, 10, replace=False)]
        values.append(_mmd2_direct(xs, ys))
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_subset_size_is_clamped_and_separates_distributions():
    rng = np.random.default_rng(9)
    ref = rng.normal(size=(200, 8))
    same = rng.normal(size=(150, 8))
    shifted = rng.normal(size=(150, 8)) + 0.5
    kid_same = metrics.kid(same, ref, num_subsets=20)  # subset_size 1000 -> 150
    assert kid_same == metrics.kid(same, ref, num_subsets=20, subset_size=150)
    kid_shifted, _ = metrics.kid(shifted, ref, num_subsets=20)
    assert kid_shifted > 10 * abs(kid_same[0])
    assert kid_shifted == pytest.approx(_mmd2_direct(shifted, ref[:150]), rel=0.3)


def test_kid_validation():
    with pytest.raises(ValueError, match="one D"):
        metrics.kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(np.zeros((1, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="num_subsets"):
        metrics.kid(np.zeros((4, 2)), np.zeros((4, 2)), num_subsets=0)


# --- Inception Score ------------------------------------------------------------------------


def _is_direct(probs, splits):
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(axis=0)
        kls = [sum(p[k] * np.log(p[k] / py[k]) for k in range(len(p)) if p[k] > 0) for p in part]
        scores.append(np.exp(np.mean(kls)))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_direct_computation():
    rng = np.random.default_rng(10)
    logits = 3.0 * rng.normal(size=(40, 7))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[0] = np.eye(7)[2]  # exact zeros are allowed
    mean, std = metrics.inception_score(probs, splits=4)
    ref_mean, ref_std = _is_direct(probs, 4)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9)


def test_inception_score_extremes():
    uniform = np.full((50, 10), 0.1)
    assert metrics.inception_score(uniform, splits=5) == pytest.approx((1.0, 0.0))
    one_hot = np.tile(np.eye(10), (6, 1))  # each split of 20 holds every class twice
    assert metrics.inception_score(one_hot, splits=3) == pytest.approx((10.0, 0.0))
    same_class = np.tile(np.eye(10)[4], (20, 1))
    assert metrics.inception_score(same_class, splits=1) == pytest.approx((1.0, 0.0))


def test_inception_score_validation():
    with pytest.raises(ValueError, match="rows summing to 1"):
        metrics.inception_score(np.full((4, 3), 0.5), splits=1)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.full((4, 2), 0.5), splits=5)
