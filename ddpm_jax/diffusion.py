"""The forward process q(x_t | x_0), its posterior, and conversions between parametrizations.

All functions are pure and take a :class:`~ddpm_jax.schedules.Schedule`. ``t`` is an int32 ``[B]``
array of 0-based timesteps (``t ∈ [0, T)``; ``alpha_bars[t]`` is ᾱ_{t+1} in Ho et al.'s 1-based
notation); per-timestep coefficients are broadcast over the remaining dimensions of ``x``, so any
data rank works (images ``[B, H, W, C]``, latents, 1-D signals ``[B, D]``). Outputs have the dtype
of the data input.

The public functions check their arguments' shapes and dtypes (:func:`check_data`,
:func:`check_timesteps`) and raise ValueError naming the argument, the shape received and the one
expected. The checks read only static shapes and dtypes, so they cost nothing under ``jax.jit``.

Model outputs come in three parametrizations (``prediction``):

- ``"eps"``: the noise ε (Ho et al. 2020);
- ``"x0"``: the clean sample x_0;
- ``"v"``: the velocity v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large")


def extract(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """Gathers ``table[t]`` and shapes it to broadcast against ``x``.

    Args:
        table: ``[T]`` float32 schedule table.
        t: int32 ``[B]`` timesteps (a scalar is broadcast over the batch).
        x: ``[B, ...]`` array whose rank and dtype the result follows.

    Returns:
        ``[B, 1, ..., 1]`` values of ``table`` at ``t`` in ``x.dtype``.
    """
    t = jnp.asarray(t)
    values = table[t].astype(x.dtype)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _dtype(a) -> np.dtype:
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def check_data(where: str, **arrays) -> int:
    """Raises ValueError unless the arrays are float ``[B, ...]`` of rank >= 2 and equal shapes.

    The first keyword argument sets the expected shape; the others must have it exactly.

    Args:
        where: the calling function, for the message (e.g. ``"q_sample"``).
        **arrays: the data arguments by name, e.g. ``x0=x0, noise=noise``.

    Returns:
        B, the batch size (the leading dimension).

    Example:
        >>> check_data("q_sample", x0=jnp.zeros((8, 4)), noise=jnp.zeros((8, 3)))
        Traceback (most recent call last):
        ValueError: q_sample: noise must have the shape of x0 (8, 4), got (8, 3)
    """
    (first, x), *rest = arrays.items()
    shape = tuple(jnp.shape(x))
    if len(shape) < 2:
        raise ValueError(
            f"{where}: {first} must be [B, ...] with at least one axis after the batch axis "
            f"(e.g. [B, H, W, C] or [B, D]), got shape {shape}"
        )
    for name, a in rest:
        if tuple(jnp.shape(a)) != shape:
            raise ValueError(
                f"{where}: {name} must have the shape of {first} {shape}, got {tuple(jnp.shape(a))}"
            )
    for name, a in arrays.items():
        if not jnp.issubdtype(_dtype(a), jnp.floating):
            raise ValueError(f"{where}: {name} must be a float array, got {_dtype(a)}")
    return shape[0]


def check_timesteps(where: str, t, batch: int | None = None) -> None:
    """Raises ValueError unless ``t`` is an integer array of shape ``[batch]`` (``[B]`` if None).

    Args:
        where: the calling function, for the message.
        t: the timesteps argument.
        batch: B, the leading dimension of the data, or None.

    Example:
        >>> check_timesteps("q_sample", jnp.zeros((8, 1)), 8)
        Traceback (most recent call last):
        ValueError: q_sample: t must be int32 [B] = (8,), got float32 (8, 1)
    """
    shape, dtype = tuple(jnp.shape(t)), _dtype(t)
    ok_shape = len(shape) == 1 if batch is None else shape == (batch,)
    if not (ok_shape and jnp.issubdtype(dtype, jnp.integer)):
        expected = "[B]" if batch is None else f"[B] = ({batch},)"
        raise ValueError(f"{where}: t must be int32 {expected}, got {dtype} {shape}")


def check_prediction(prediction: str) -> None:
    """Raises ValueError unless ``prediction`` is one of "eps", "x0", "v"."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) in closed form (Ho et al. 2020, Eq. 4).

    x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε.

    Args:
        schedule: the noise schedule.
        x0: ``[B, ...]`` clean data, e.g. ``[B, H, W, C]`` float32 in [-1, 1].
        t: int32 ``[B]`` timesteps in [0, T).
        noise: ε, same shape as ``x0``, standard normal.

    Returns:
        x_t, same shape and dtype as ``x0``.
    """
    batch = check_data("q_sample", x0=x0, noise=noise)
    check_timesteps("q_sample", t, batch)
    return extract(schedule.sqrt_alpha_bars, t, x0) * x0 + extract(
        schedule.sqrt_one_minus_alpha_bars, t, x0
    ) * noise.astype(x0.dtype)


def q_sample_with_key(
    schedule: Schedule, key: jax.Array, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Draws ε ~ N(0, I) from ``key`` and returns ``(q_sample(schedule, x0, t, ε), ε)``.

    Args:
        schedule: the noise schedule.
        key: a PRNG key.
        x0: ``[B, ...]`` clean data.
        t: int32 ``[B]`` timesteps in [0, T).

    Returns:
        ``(x_t, noise)``, both shaped like ``x0``.
    """
    batch = check_data("q_sample_with_key", x0=x0)
    check_timesteps("q_sample_with_key", t, batch)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return q_sample(schedule, x0, t, noise), noise


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward-process posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6–7).

    μ̃_t = β_t √ᾱ_{t-1} / (1 - ᾱ_t) · x_0 + (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t) · x_t and
    β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t). At t = 0 the posterior is a point mass at x_0.

    Args:
        schedule: the noise schedule.
        x0: ``[B, ...]`` clean data (or a prediction of it).
        x_t: ``[B, ...]`` noisy data at timestep ``t``.
        t: int32 ``[B]`` timesteps in [0, T).

    Returns:
        ``(mean, variance, log_variance)``: mean ``[B, ...]``; variance and the clipped log-variance
        ``[B, 1, ..., 1]`` (broadcastable to the data).
    """
    batch = check_data("q_posterior_mean_variance", x_t=x_t, x0=x0)
    check_timesteps("q_posterior_mean_variance", t, batch)
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array):
    """x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t (inverse of Eq. 4; Ho et al. Eq. 15).

    Args:
        schedule: the noise schedule.
        x_t: ``[B, ...]`` noisy data.
        t: int32 ``[B]`` timesteps.
        eps: ``[B, ...]`` predicted noise.

    Returns:
        ``[B, ...]`` predicted x_0.
    """
    batch = check_data("predict_x0_from_eps", x_t=x_t, eps=eps)
    check_timesteps("predict_x0_from_eps", t, batch)
    return (
        extract(schedule.sqrt_recip_alpha_bars, t, x_t) * x_t
        - extract(schedule.sqrt_recipm1_alpha_bars, t, x_t) * eps
    )


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array):
    """ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t) (Eq. 4 solved for ε).

    Args:
        schedule: the noise schedule.
        x_t: ``[B, ...]`` noisy data.
        t: int32 ``[B]`` timesteps.
        x0: ``[B, ...]`` predicted clean data.

    Returns:
        ``[B, ...]`` the implied noise.
    """
    batch = check_data("predict_eps_from_x0", x_t=x_t, x0=x0)
    check_timesteps("predict_eps_from_x0", t, batch)
    return (extract(schedule.sqrt_recip_alpha_bars, t, x_t) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alpha_bars, t, x_t
    )


def predict_v(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array):
    """The v-target v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022, Sec. 4).

    Args:
        schedule: the noise schedule.
        x0: ``[B, ...]`` clean data.
        t: int32 ``[B]`` timesteps.
        eps: ``[B, ...]`` noise.

    Returns:
        ``[B, ...]`` v.
    """
    batch = check_data("predict_v", x0=x0, eps=eps)
    check_timesteps("predict_v", t, batch)
    return (
        extract(schedule.sqrt_alpha_bars, t, x0) * eps
        - extract(schedule.sqrt_one_minus_alpha_bars, t, x0) * x0
    )


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v (Salimans & Ho 2022).

    Args:
        schedule: the noise schedule.
        x_t: ``[B, ...]`` noisy data.
        t: int32 ``[B]`` timesteps.
        v: ``[B, ...]`` predicted velocity.

    Returns:
        ``[B, ...]`` predicted x_0.
    """
    batch = check_data("predict_x0_from_v", x_t=x_t, v=v)
    check_timesteps("predict_x0_from_v", t, batch)
    return (
        extract(schedule.sqrt_alpha_bars, t, x_t) * x_t
        - extract(schedule.sqrt_one_minus_alpha_bars, t, x_t) * v
    )


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """ε = √(1-ᾱ_t) x_t + √ᾱ_t v (Salimans & Ho 2022).

    Args:
        schedule: the noise schedule.
        x_t: ``[B, ...]`` noisy data.
        t: int32 ``[B]`` timesteps.
        v: ``[B, ...]`` predicted velocity.

    Returns:
        ``[B, ...]`` the implied noise.
    """
    batch = check_data("predict_eps_from_v", x_t=x_t, v=v)
    check_timesteps("predict_eps_from_v", t, batch)
    return (
        extract(schedule.sqrt_one_minus_alpha_bars, t, x_t) * x_t
        + extract(schedule.sqrt_alpha_bars, t, x_t) * v
    )


def predict_x0_and_eps(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prediction: str = "eps",
    clip_x0: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output of any parametrization into ``(x0, eps)``.

    Args:
        schedule: the noise schedule.
        model_output: ``[B, ...]`` network output, interpreted according to ``prediction``.
        x_t: ``[B, ...]`` noisy data the output was computed from.
        t: int32 ``[B]`` timesteps.
        prediction: "eps", "x0" or "v".
        clip_x0: if set, x_0 is clipped to ``[-clip_x0, clip_x0]`` and ε recomputed from it
            (as DDPM sampling does for images in [-1, 1]).

    Returns:
        ``(x0, eps)``, each ``[B, ...]``.
    """
    check_prediction(prediction)
    batch = check_data("predict_x0_and_eps", x_t=x_t, model_output=model_output)
    check_timesteps("predict_x0_and_eps", t, batch)
    if prediction == "eps":
        eps = model_output
        x0 = predict_x0_from_eps(schedule, x_t, t, eps)
    elif prediction == "x0":
        x0 = model_output
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    else:
        x0 = predict_x0_from_v(schedule, x_t, t, model_output)
        eps = predict_eps_from_v(schedule, x_t, t, model_output)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = predict_eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


class PMeanVariance(NamedTuple):
    """Output of :func:`p_mean_variance`: the reverse step p(x_{t-1} | x_t) and the predictions."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
) -> PMeanVariance:
    """Mean and variance of the learned reverse step p_θ(x_{t-1} | x_t) (Ho et al. 2020, Sec. 3.2).

    The mean is the posterior mean μ̃_t(x̂_0, x_t) of Eq. 7 with x̂_0 predicted from the model
    output (for ε-prediction this equals Eq. 11). The variance is fixed: ``"fixed_small"`` uses the
    posterior β̃_t, ``"fixed_large"`` uses β_t (with β̃_1 at t = 0, as in Ho et al.'s code).

    Args:
        schedule: the noise schedule.
        model_output: ``[B, ...]`` network output at ``(x_t, t)``.
        x_t: ``[B, ...]`` noisy data.
        t: int32 ``[B]`` timesteps in [0, T).
        prediction: "eps", "x0" or "v" — what ``model_output`` is.
        variance: "fixed_small" or "fixed_large".
        clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]`` before computing the mean (None: no clip).

    Returns:
        :class:`PMeanVariance` with ``mean`` ``[B, ...]``, ``variance`` and ``log_variance``
        ``[B, 1, ..., 1]``, ``pred_x0`` and ``pred_eps`` ``[B, ...]``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    batch = check_data("p_mean_variance", x_t=x_t, model_output=model_output)
    check_timesteps("p_mean_variance", t, batch)
    x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t, prediction, clip_x0)
    mean, post_var, post_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    if variance == "fixed_small":
        var, log_var = post_var, post_log_var
    else:
        large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
        var = extract(large, t, x_t)
        log_var = jnp.log(var)
    return PMeanVariance(mean, var, log_var, x0, eps)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at int32 ``[B]`` timesteps; float32 ``[B]``."""
    check_timesteps("snr", t)
    return jnp.exp(schedule.log_snr[t])
