"""Noise schedules of the forward process as pure functions returning a :class:`Schedule` pytree.

Every table is computed in float64 NumPy and stored as a float32 array of length ``T``. Timesteps
are 0-based indices ``t ∈ [0, T)``: ``alpha_bars[t]`` is ᾱ_{t+1} in the 1-based notation of Ho et
al. (2020), so ``alpha_bars[0] = 1 - betas[0]`` and ``alpha_bars_prev[0] = 1``.

Example:
    >>> sched = linear(num_timesteps=1000)
    >>> sched.alpha_bars.shape
    (1000,)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("linear", "cosine", "sigmoid")  # the schedules :func:`get` builds by name

_TABLES = (
    "betas",
    "alphas",
    "alpha_bars",
    "alpha_bars_prev",
    "sqrt_alpha_bars",
    "sqrt_one_minus_alpha_bars",
    "sqrt_recip_alpha_bars",
    "sqrt_recipm1_alpha_bars",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_snr",
)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Precomputed tables of a discrete diffusion schedule (a pytree; ``num_timesteps`` is static).

    All arrays are float32 ``[T]`` indexed by the 0-based timestep ``t``:

    Attributes:
        betas: β_t, the per-step noise variances (Ho et al. 2020, Eq. 2).
        alphas: α_t = 1 - β_t.
        alpha_bars: ᾱ_t = ∏_{s≤t} α_s (Eq. 4).
        alpha_bars_prev: ᾱ_{t-1}, with ᾱ_{-1} = 1.
        sqrt_alpha_bars: √ᾱ_t.
        sqrt_one_minus_alpha_bars: √(1 - ᾱ_t).
        sqrt_recip_alpha_bars: 1 / √ᾱ_t.
        sqrt_recipm1_alpha_bars: √(1/ᾱ_t - 1).
        posterior_variance: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) (Eq. 7); zero at t = 0.
        posterior_log_variance_clipped: log β̃_t with β̃_0 replaced by β̃_1 (finite at t = 0).
        posterior_mean_coef1: coefficient of x_0 in μ̃_t (Eq. 7): β_t √ᾱ_{t-1} / (1 - ᾱ_t).
        posterior_mean_coef2: coefficient of x_t in μ̃_t: (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t).
        log_snr: λ_t = log(ᾱ_t / (1 - ᾱ_t)), decreasing in t.
        num_timesteps: T (static metadata, not a leaf).
    """

    betas: jax.Array
    alphas: jax.Array
    alpha_bars: jax.Array
    alpha_bars_prev: jax.Array
    sqrt_alpha_bars: jax.Array
    sqrt_one_minus_alpha_bars: jax.Array
    sqrt_recip_alpha_bars: jax.Array
    sqrt_recipm1_alpha_bars: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    log_snr: jax.Array
    num_timesteps: int


jax.tree_util.register_dataclass(Schedule, data_fields=list(_TABLES), meta_fields=["num_timesteps"])


def from_betas(betas) -> Schedule:
    """Builds a :class:`Schedule` from an arbitrary sequence of betas.

    Args:
        betas: ``[T]`` values in (0, 1); converted to float64 NumPy for the table computations.

    Returns:
        The schedule, every table float32 ``[T]``.

    Raises:
        ValueError: if ``betas`` is not 1-D, is empty, or has values outside (0, 1).
    """
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
        raise ValueError(f"betas must lie in (0, 1); got min={b.min():.3g}, max={b.max():.3g}")
    alphas = 1.0 - b
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1.0 - ab_prev) / (1.0 - ab)
    # β̃_0 = 0; the clipped log uses β̃_1 there, as in Ho et al.'s code.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if b.size > 1 else np.log(b)
    tables = dict(
        betas=b,
        alphas=alphas,
        alpha_bars=ab,
        alpha_bars_prev=ab_prev,
        sqrt_alpha_bars=np.sqrt(ab),
        sqrt_one_minus_alpha_bars=np.sqrt(1.0 - ab),
        sqrt_recip_alpha_bars=np.sqrt(1.0 / ab),
        sqrt_recipm1_alpha_bars=np.sqrt(1.0 / ab - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),
        posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        log_snr=np.log(ab) - np.log1p(-ab),
    )
    return Schedule(
        **{k: jnp.asarray(v.astype(np.float32)) for k, v in tables.items()},
        num_timesteps=int(b.size),
    )


def _check_num_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")


def _betas_from_alpha_bar(alpha_bar_fn, num_timesteps: int, max_beta: float) -> np.ndarray:
    """β_t = min(1 - ᾱ(t+1/T) / ᾱ(t/T), max_beta) for a continuous ᾱ(τ), τ ∈ [0, 1]."""
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    ab = alpha_bar_fn(tau)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The linear schedule of Ho et al. (2020): β_t evenly spaced, ``beta_start`` to ``beta_end``.

    The defaults are the paper's values for T = 1000. They are used as given for any T; for a much
    shorter chain scale both by 1000 / T (as improved-diffusion does) so that ᾱ_{T-1} stays near 0.

    Args:
        num_timesteps: T.
        beta_start: β of the first step (t = 0).
        beta_end: β of the last step (t = T - 1).

    Returns:
        The schedule.
    """
    _check_num_timesteps(num_timesteps)
    return from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """The cosine schedule of Nichol & Dhariwal (2021), Eq. 17.

    ᾱ(τ) = f(τ) / f(0) with f(τ) = cos²((τ + s) / (1 + s) · π/2), discretised as
    β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), ``max_beta``).

    Args:
        num_timesteps: T.
        s: small offset that keeps β near t = 0 from being too small.
        max_beta: clip on β to avoid the singularity at τ = 1.

    Returns:
        The schedule.
    """
    _check_num_timesteps(num_timesteps)

    def alpha_bar(tau):
        return np.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

    return from_betas(_betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta))


def sigmoid(
    num_timesteps: int = 1000,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> Schedule:
    """The sigmoid schedule of Jabri et al. (2022) / Chen (2023), "On the importance of noise
    scheduling", Algorithm 1.

    ᾱ(τ) = (σ(end/τ_s) - σ((τ(end - start) + start)/τ_s)) / (σ(end/τ_s) - σ(start/τ_s)), where
    τ_s is the temperature ``tau``; discretised like :func:`cosine`.

    Args:
        num_timesteps: T.
        start: left end of the sigmoid's input range.
        end: right end of the sigmoid's input range.
        tau: temperature; larger values flatten the schedule.
        max_beta: clip on β near τ = 1.

    Returns:
        The schedule.

    Raises:
        ValueError: if ``start >= end`` or ``tau <= 0``.
    """
    _check_num_timesteps(num_timesteps)
    if not start < end:
        raise ValueError(f"sigmoid schedule needs start < end, got start={start}, end={end}")
    if not tau > 0:
        raise ValueError(f"sigmoid schedule needs tau > 0, got tau={tau}")

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(t):
        return (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)

    return from_betas(_betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta))


def get(name: str, num_timesteps: int = 1000, **kwargs) -> Schedule:
    """Returns the schedule called ``name``, one of :data:`NAMES`.

    Args:
        name: "linear", "cosine" or "sigmoid".
        num_timesteps: T.
        **kwargs: the schedule's other arguments (e.g. ``beta_start`` for "linear").

    Returns:
        The schedule.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {NAMES}")
    makers = {"linear": linear, "cosine": cosine, "sigmoid": sigmoid}
    return makers[name](num_timesteps, **kwargs)
