"""Sample-quality metrics: FID, KID and Inception Score, on features in float64 NumPy.

The math runs on the host and needs no network:

- `RunningStats` accumulates the mean and covariance of features batch by batch (Chan et al.'s
  pairwise update), so 50,000 feature vectors never need to sit in memory at once.
- `frechet_distance` is the Fréchet distance between two Gaussians (FID when the statistics are
  those of Inception pool features). It is exact for singular covariances.
- `kid` is the Kernel Inception Distance: the unbiased MMD² with the cubic polynomial kernel,
  averaged over random subsets.
- `inception_score` is exp(E KL(p(y|x) || p(y))) averaged over splits.

The features come from a network: pytorch-fid's Inception-v3
(:func:`ddpm_jax.weights.fid_inception.inception_from_pth`) or, for the 8x8 digits, the small
classifier of :mod:`ddpm_jax.evaluation.digits_classifier`.

Example:
    >>> from ddpm_jax.weights.fid_inception import inception_from_pth
    >>> features_fn = inception_from_pth("pt_inception-2015-12-05-6726825d.pth")
    >>> stats = RunningStats.init(2048)
    >>> for batch in uint8_batches:                  # [B, H, W, 3] uint8
    ...     stats = stats.update(features_fn(batch))
    >>> fid = frechet_distance(*stats.mean_cov(), *reference_stats.mean_cov())
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np


class RunningStats(NamedTuple):
    """Streaming mean and covariance of feature vectors, in float64.

    Immutable: `update` and `merge` return new statistics. Batches are combined with the pairwise
    update of Chan, Golub & LeVeque (1979), which stays accurate when the mean is large compared
    with the spread (unlike accumulating raw sums of squares).

    Attributes:
        count: number of feature vectors seen.
        mean: [D] float64 mean of the features.
        m2: [D, D] float64 sum over samples of outer(x - mean, x - mean).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def init(cls, dim: int) -> RunningStats:
        """Empty statistics for `dim`-dimensional features."""
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, features) -> RunningStats:
        """Adds a batch of features.

        Args:
            features: [B, D] array (any float dtype; accumulated in float64). B may be 0.

        Returns:
            The statistics of all features seen so far.
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features must have shape [B, {self.mean.shape[0]}], got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return self
        batch_mean = x.mean(axis=0)
        centered = x - batch_mean
        return self.merge(RunningStats(x.shape[0], batch_mean, centered.T @ centered))

    def merge(self, other: RunningStats) -> RunningStats:
        """Combines statistics of two disjoint sets of features (e.g. from two hosts)."""
        if other.mean.shape != self.mean.shape:
            raise ValueError(
                f"cannot merge statistics of dimension {other.mean.shape} into {self.mean.shape}"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / count)
        return RunningStats(count, mean, m2)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (mean [D], covariance [D, D]) in float64, covariance with ddof=1 (np.cov)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


def _clip_eigenvalues(eigvals: np.ndarray) -> np.ndarray:
    """Zeroes eigenvalues of a PSD matrix that are round-off: below D * eps * the largest.

    Their square roots would otherwise add noise of order sqrt(eps) to the trace term.
    """
    cutoff = eigvals.shape[0] * np.finfo(np.float64).eps * max(np.abs(eigvals).max(), 0.0)
    return np.where(eigvals > cutoff, eigvals, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(_clip_eigenvalues(eigvals))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½).

    The trace term is computed as the sum of square roots of the eigenvalues of
    sigma1^½ sigma2 sigma1^½, which has the same spectrum as sigma1 sigma2 but is symmetric PSD:
    no complex intermediate results and no regularisation, so rank-deficient covariances (fewer
    samples than feature dimensions) are handled exactly. Computed in float64.

    Args:
        mu1: [D] mean of the first Gaussian.
        sigma1: [D, D] symmetric PSD covariance of the first Gaussian.
        mu2: [D] mean of the second Gaussian.
        sigma2: [D, D] symmetric PSD covariance of the second Gaussian.

    Returns:
        The distance as a Python float (FID when the inputs are Inception feature statistics).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one shape, got {mu1.shape}, {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {sigma.shape}")
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    sqrt1 = _psd_sqrt(sigma1)
    product = sqrt1 @ sigma2 @ sqrt1
    eigvals = np.linalg.eigvalsh(0.5 * (product + product.T))
    tr_covmean = np.sqrt(_clip_eigenvalues(eigvals)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def kid(
    features1,
    features2,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with the kernel k(x, y) = (x·y / D + 1)³.

    For each of `num_subsets` subsets, m = min(subset_size, N1, N2) rows are drawn without
    replacement from each set and the unbiased estimator

        1/(m(m-1)) Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m² Σ_{i,j} k(x_i, y_j)

    is evaluated (as in clean-fid and torch-fidelity). It can be slightly negative.

    Args:
        features1: [N1, D] features of the first set.
        features2: [N2, D] features of the second set.
        num_subsets: number of random subsets to average over.
        subset_size: rows per subset; clamped to min(N1, N2).
        seed: seed of the NumPy generator that draws the subsets.

    Returns:
        (mean, std) of the per-subset MMD² values, as Python floats.
    """
    x = np.asarray(features1, np.float64)
    y = np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"features1 and features2 must be [N, D] with one D, got {x.shape}, {y.shape}"
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set, got {x.shape[0]}, {y.shape[0]}"
        )
    dim = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, np.float64)
    for s in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        k_xx = (xs @ xs.T / dim + 1.0) ** 3
        k_yy = (ys @ ys.T / dim + 1.0) ** 3
        k_xy = (xs @ ys.T / dim + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(probs, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal splits.

    p(y) is the mean prediction within each split (as in the original implementation). Terms with
    p(y|x) = 0 contribute 0.

    Args:
        probs: [N, K] class probabilities (rows sum to 1), e.g. softmax of Inception logits.
        splits: number of consecutive splits; N must be at least `splits`.

    Returns:
        (mean, std) over splits, as Python floats. 1 for identical predictions; K for confident
        predictions spread evenly over K classes.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape [N, K], got {p.shape}")
    if splits < 1 or splits > p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative with rows summing to 1")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)  # 0 only where the whole column is 0
        ratio = np.where(part > 0, part, 1.0) / np.where(marginal > 0, marginal, 1.0)
        kl = np.sum(np.where(part > 0, part * np.log(ratio), 0.0), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def accumulate_stats(features_fn: Callable, batches: Iterable, dim: int) -> RunningStats:
    """Runs `features_fn` over `batches` and accumulates the statistics of its outputs.

    Args:
        features_fn: maps one batch to [B, dim] features (e.g. from
            `ddpm_jax.weights.fid_inception.inception_from_pth`).
        batches: iterable of batches (e.g. [B, H, W, 3] uint8 images).
        dim: feature dimension.

    Returns:
        The `RunningStats` of all features; only one batch of features is held at a time.
    """
    stats = RunningStats.init(dim)
    for batch in batches:
        stats = stats.update(features_fn(batch))
    return stats
