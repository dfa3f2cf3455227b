"""Training losses for diffusion models, written against ``model_fn(x_t, t, **cond)``.

The simplified objective of Ho et al. (2020), Eq. 14: sample t uniformly and ε ~ N(0, I), form
x_t = q_sample(x_0, t, ε) and regress the network output onto its target with a mean squared
error. Targets: ``"eps"`` (ε), ``"x0"`` (x_0) or ``"v"`` (√ᾱ_t ε - √(1-ᾱ_t) x_0). Weightings:
``"uniform"`` (Ho et al.) and ``"min_snr"`` (Min-SNR-γ, Hang et al. 2023).

Example:
    >>> def model_fn(x_t, t):
    ...     return jnp.zeros_like(x_t)
    >>> t, noise = sample_timesteps_and_noise(key, x0, schedule.num_timesteps)
    >>> loss = diffusion_loss(model_fn, schedule, x0, t, noise)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule

WEIGHTINGS = ("uniform", "min_snr")
REDUCTIONS = ("mean", "none")


def sample_timesteps_and_noise(
    key: jax.Array, x0: jax.Array, num_timesteps: int
) -> tuple[jax.Array, jax.Array]:
    """Draws t ~ U{0, …, T-1} per example and ε ~ N(0, I) shaped like ``x0``.

    Args:
        key: a PRNG key.
        x0: ``[B, ...]`` clean data (only its shape and dtype are used).
        num_timesteps: T.

    Returns:
        ``(t, noise)``: int32 ``[B]`` and ``[B, ...]`` in ``x0.dtype``.
    """
    diffusion.check_data("sample_timesteps_and_noise", x0=x0)
    key_t, key_n = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(key_n, x0.shape, x0.dtype)


def loss_weights(
    schedule: Schedule, t: jax.Array, prediction: str, weighting: str, min_snr_gamma: float = 5.0
) -> jax.Array:
    """Per-example weights of the squared error in the target space of ``prediction``.

    ``"uniform"`` gives 1. ``"min_snr"`` (Hang et al. 2023, Eq. 8) weights every target so that the
    loss equals min(SNR_t, γ) · ||x_0 - x̂_0||²: min(SNR, γ)/SNR for ε, min(SNR, γ) for x_0 and
    min(SNR, γ)/(SNR + 1) for v.

    Args:
        schedule: the noise schedule.
        t: int32 ``[B]`` timesteps.
        prediction: "eps", "x0" or "v".
        weighting: "uniform" or "min_snr".
        min_snr_gamma: γ.

    Returns:
        float32 ``[B]`` weights.
    """
    diffusion.check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    diffusion.check_timesteps("loss_weights", t)
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    snr = diffusion.snr(schedule, t)
    clipped = jnp.minimum(snr, min_snr_gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def diffusion_loss(
    model_fn: Callable[..., jax.Array],
    schedule: Schedule,
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    reduction: str = "mean",
    cond: dict | None = None,
) -> jax.Array:
    """The simplified diffusion loss L_simple (Ho et al. 2020, Eq. 14) for given t and noise.

    L = w(t) · mean over non-batch dims of (model_fn(x_t, t, **cond) - target)², with
    x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> [B, ...]`` network output of kind ``prediction``.
        schedule: the noise schedule.
        x0: ``[B, ...]`` clean data, e.g. ``[B, H, W, C]`` float32 in [-1, 1].
        t: int32 ``[B]`` timesteps in [0, T).
        noise: ε, ``[B, ...]`` standard normal.
        prediction: the target: "eps", "x0" or "v".
        weighting: "uniform" or "min_snr".
        min_snr_gamma: γ for "min_snr".
        reduction: "mean" for a scalar, "none" for the float32 ``[B]`` per-example losses.
        cond: extra keyword arguments for ``model_fn`` (labels ``y``, ``context``, ...).

    Returns:
        float32 scalar, or ``[B]`` per-example losses.

    Raises:
        ValueError: for an unknown prediction, weighting or reduction; ``t`` not int ``[B]``;
            ``noise`` or the model output not shaped like ``x0``.
    """
    diffusion.check_prediction(prediction)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    batch = diffusion.check_data("diffusion_loss", x0=x0, noise=noise)
    diffusion.check_timesteps("diffusion_loss", t, batch)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    output = model_fn(x_t, t, **(cond or {}))
    if jnp.shape(output) != x_t.shape:
        raise ValueError(
            f"diffusion_loss: model_fn(x_t, t) must return an array shaped like x_t {x_t.shape}, "
            f"got {jnp.shape(output)}"
        )
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = diffusion.predict_v(schedule, x0, t, noise)
    sq = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(sq.reshape(sq.shape[0], -1), axis=1)
    per_example = per_example * loss_weights(schedule, t, prediction, weighting, min_snr_gamma)
    return per_example if reduction == "none" else jnp.mean(per_example)


def diffusion_loss_with_key(
    model_fn: Callable[..., jax.Array],
    schedule: Schedule,
    key: jax.Array,
    x0: jax.Array,
    **kwargs,
) -> jax.Array:
    """:func:`diffusion_loss` with t and ε drawn from ``key`` (see
    :func:`sample_timesteps_and_noise`). Keyword arguments are passed through."""
    t, noise = sample_timesteps_and_noise(key, x0, schedule.num_timesteps)
    return diffusion_loss(model_fn, schedule, x0, t, noise, **kwargs)
