"""Exact denoisers and velocities of Gaussian and Gaussian-mixture data, for NumPy and JAX.

Data x_0 ~ Σ_k w_k N(μ_k, s_k² I). In EDM's coordinates x = x_0 + σ n the component k has
x ~ N(μ_k, (s_k² + σ²) I); in flow matching's x_t = (1 - t) x_0 + t ε it has
x_t ~ N((1 - t) μ_k, ((1 - t)² s_k² + t²) I). The posterior means are affine per component and
the responsibilities r_k(x) ∝ w_k N(x; component k) mix them, so D(x; σ) = E[x_0 | x] and
v(x_t, t) = E[ε - x_0 | x_t] are exact. ``xp`` is ``numpy`` (float64 references) or
``jax.numpy``.
"""

import numpy as np

WEIGHTS = np.array([0.2, 0.5, 0.3])
MEANS = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
STDS = np.array([0.3, 0.5, 0.4])


def _responsibilities(xp, x, centers, variances):
    """r_k(x) for isotropic components: x [B, D], centers [B or 1, K, D], variances [B, K]."""
    d = x.shape[-1]
    sq = xp.sum((x[:, None, :] - centers) ** 2, axis=-1)
    logits = np.log(WEIGHTS) - 0.5 * d * xp.log(variances) - 0.5 * sq / variances
    logits = logits - xp.max(logits, axis=1, keepdims=True)
    p = xp.exp(logits)
    return p / xp.sum(p, axis=1, keepdims=True)


def mixture_denoiser(xp, x, sigma):
    """E[x_0 | x] at noise level σ (scalar or [B]) for the mixture; x [B, 2]."""
    sigma = xp.broadcast_to(xp.asarray(sigma, x.dtype), (x.shape[0],))[:, None]
    s2 = xp.asarray(STDS**2, x.dtype)[None, :]
    var = s2 + sigma**2  # [B, K]
    r = _responsibilities(xp, x, xp.asarray(MEANS, x.dtype)[None], var)
    mu = xp.asarray(MEANS, x.dtype)[None]
    post = mu + (s2 / var)[..., None] * (x[:, None, :] - mu)
    return xp.sum(r[..., None] * post, axis=1)


def mixture_velocity(xp, x, t):
    """E[ε - x_0 | x_t] at time t (scalar or [B]) for the mixture; x [B, 2]."""
    t = xp.broadcast_to(xp.asarray(t, x.dtype), (x.shape[0],))[:, None]
    s2 = xp.asarray(STDS**2, x.dtype)[None, :]
    var = (1 - t) ** 2 * s2 + t**2  # [B, K]
    centers = (1 - t)[..., None] * xp.asarray(MEANS, x.dtype)[None]  # [B, K, D]
    r = _responsibilities(xp, x, centers, var)
    resid = x[:, None, :] - centers
    e_x0 = xp.asarray(MEANS, x.dtype)[None] + ((1 - t) * s2 / var)[..., None] * resid
    e_eps = (t / var)[..., None] * resid
    return xp.sum(r[..., None] * (e_eps - e_x0), axis=1)


def assign(x):
    """Nearest-mean component of each sample; returns (weights [K], means [K, 2])."""
    x = np.asarray(x, np.float64)
    k = np.argmin(((x[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(k, minlength=len(WEIGHTS)) / len(x)
    means = np.stack([x[k == j].mean(0) for j in range(len(WEIGHTS))])
    return weights, means


# A single Gaussian per dimension: N(MU, diag(SD²)).
MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.5, 1.0, 0.2, 1.5])


def gaussian_denoiser(xp, x, sigma):
    """E[x_0 | x_0 + σ n] = μ + s²/(s² + σ²) (x - μ); σ scalar or [B]."""
    sigma = xp.broadcast_to(xp.asarray(sigma, x.dtype), (x.shape[0],))[:, None]
    mu, s2 = xp.asarray(MU, x.dtype), xp.asarray(SD**2, x.dtype)
    return mu + s2 / (s2 + sigma**2) * (x - mu)
