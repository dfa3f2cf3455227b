"""Samplers of the reverse process, each one ``jax.lax.scan`` over a grid of training timesteps.

Every sampler drives ``model_fn(x_t, t) -> prediction`` (``x_t: [B, ...]``, ``t: int32 [B]`` on the
training grid ``[0, T)``; the output is ε, x_0 or v according to ``prediction``) along a strictly
decreasing grid ``t_0 > t_1 > … > t_{N-1} = 0`` of ``N = num_steps`` training timesteps. Steps
``t_i → t_{i+1}`` run inside one ``jax.lax.scan``; a final step from ``t = 0`` to clean data returns
the prediction x̂_0 there (every method's last update to ᾱ = 1 reduces to it).

Methods (``method``), with their model evaluations per sample:

- ``"ddpm"``: ancestral sampling (Ho et al. 2020, Algorithm 2) with ``variance="fixed_small"`` (β̃)
  or ``"fixed_large"`` (β); on a respaced grid a step t → s uses the effective
  β = 1 - ᾱ_t / ᾱ_s (improved-diffusion respacing). ``N`` evaluations.
- ``"ddim"``: DDIM (Song et al. 2021, Eq. 12) with ``eta`` (0: deterministic, 1: the ancestral
  sampler). ``N`` evaluations.
- ``"dpmpp_2m"``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, second order
  multistep with a first-order first step and a first-order final step to σ = 0. ``N``
  evaluations.
- ``"heun"``: Heun's second-order method on the probability-flow ODE dx̃/dσ = ε̂ in the variance
  exploding coordinates x̃ = x / √ᾱ, σ = √((1-ᾱ)/ᾱ) (Karras et al. 2022, Algorithm 1 with no
  churn), Euler for the last step to σ = 0. ``2N - 1`` evaluations.

Default grids (``timestep_spacing=None``): ``"uniform"`` for ddpm / ddim (Song et al.),
``"logsnr"`` for dpmpp_2m (Lu et al.), ``"karras"`` (ρ = 7) for heun; see
:func:`ddpm_jax.spacing.timesteps` (also importable as ``samplers.timesteps``).

The functions are traceable: wrap the sampler in ``jax.jit`` (the schedule, ``key``, ``eta``,
``x_T`` and anything ``model_fn`` closes over stay traced, so changing them does not recompile)::

    @jax.jit
    def generate(params, key, eta):
        model_fn = lambda x, t: unet.apply(params, x, t)
        return samplers.sample(model_fn, schedule, key, (64, 32, 32, 3), eta=eta)

Called without ``jax.jit`` the sampler still runs as one scan, but the scan is traced and compiled
again on every call. For many samples at once, shard the batch of ``x_T`` (or of the output) over
the devices; the random draws are partitionable, so the samples do not depend on the sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule
from ddpm_jax.spacing import SPACINGS, check_num_steps, timesteps

METHODS = ("ddpm", "ddim", "dpmpp_2m", "heun")
DEFAULT_SPACINGS = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "logsnr", "heun": "karras"}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _is_concrete_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def num_model_evals(method: str, num_steps: int) -> int:
    """Network evaluations per sample: ``num_steps``, or ``2 * num_steps - 1`` for "heun"."""
    _check_choice("method", method, METHODS)
    return 2 * num_steps - 1 if method == "heun" else num_steps


class Plan(NamedTuple):
    """What one run of a sampler iterates over: ``carry`` through ``step`` for each row of ``xs``.

    Attributes:
        carry: ``(x, aux)`` — x ``[B, ...]`` the state at ``t_0`` (x_T), ``aux`` the previous x̂_0
            for "dpmpp_2m" (None otherwise).
        xs: dict of per-step arrays with leading axis ``num_steps - 1``: ``t`` and ``s``
            (int32 timesteps of each step t → s), the method's coefficients and, for stochastic
            methods, ``key``.
    """

    carry: Any
    xs: dict[str, jax.Array]


def _respaced_posterior(schedule: Schedule, t: jax.Array, s: jax.Array):
    """q(x_s | x_t, x_0) for s < t: the DDPM posterior with α = ᾱ_t/ᾱ_s (improved diffusion).

    Returns ``(c1, c2, var, beta)``: mean = c1 x_0 + c2 x_t, variance ``var`` (β̃) and the effective
    β. Adjacent steps (s = t - 1) take the schedule's own float64-derived tables, so the full grid
    is Ho et al.'s chain exactly.
    """
    ab_t, ab_s = schedule.alpha_bars[t], schedule.alpha_bars[s]
    om_t, om_s = (
        schedule.sqrt_one_minus_alpha_bars[t] ** 2,
        schedule.sqrt_one_minus_alpha_bars[s] ** 2,
    )
    beta = 1.0 - ab_t / ab_s
    c1 = beta * schedule.sqrt_alpha_bars[s] / om_t
    c2 = om_s * jnp.sqrt(ab_t / ab_s) / om_t
    var = beta * om_s / om_t
    adjacent = s == t - 1
    return (
        jnp.where(adjacent, schedule.posterior_mean_coef1[t], c1),
        jnp.where(adjacent, schedule.posterior_mean_coef2[t], c2),
        jnp.where(adjacent, schedule.posterior_variance[t], var),
        jnp.where(adjacent, schedule.betas[t], beta),
    )


def plan(
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddim",
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    timestep_spacing: str | None = None,
    variance: str = "fixed_small",
    x_T: jax.Array | None = None,
) -> Plan:
    """The initial state and the per-step coefficients of a sampler (the scan's carry and xs).

    :func:`sample` is ``finish(scan(step, *plan(...)))``; this lower-level form lets a caller run
    the same steps another way (e.g. a Python loop over a jitted :func:`step`, as the benchmark
    does). Arguments are those of :func:`sample`.

    Returns:
        A :class:`Plan`.

    Raises:
        ValueError: for an invalid method, spacing, num_steps, variance, shape, x_T or eta.
    """
    _validate_plan(schedule, shape, method, num_steps, eta, timestep_spacing, variance, x_T)
    spacing = timestep_spacing or DEFAULT_SPACINGS[method]
    grid = timesteps(schedule, num_steps, spacing)
    t, s = grid[:-1], grid[1:]
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 key data
        key = jax.random.wrap_key_data(key)
    per_example = key.ndim == 1  # one key per sample (see `sample`)
    if per_example and key.shape[0] != shape[0]:
        raise ValueError(f"key: {key.shape[0]} per-sample keys for a batch of {shape[0]}")
    if per_example:
        key_init, key_steps = jax.vmap(jax.random.split, out_axes=1)(key)
    else:
        key_init, key_steps = jax.random.split(key)
    if x_T is not None:
        x = jnp.asarray(x_T, jnp.float32)
    elif per_example:
        x = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key_init)
    else:
        x = jax.random.normal(key_init, shape, jnp.float32)
    xs: dict[str, jax.Array] = {"t": t, "s": s}
    sqrt_ab, sqrt_om = schedule.sqrt_alpha_bars, schedule.sqrt_one_minus_alpha_bars
    if method == "ddpm":
        c1, c2, var_small, beta = _respaced_posterior(schedule, t, s)
        var = var_small if variance == "fixed_small" else beta
        xs.update(c1=c1, c2=c2, std=jnp.exp(0.5 * jnp.log(var)))
    elif method == "ddim":
        _, _, var_small, _ = _respaced_posterior(schedule, t, s)
        sigma = jnp.asarray(eta, jnp.float32) * jnp.sqrt(var_small)  # Song et al. Eq. 16
        direction = jnp.sqrt(jnp.maximum(sqrt_om[s] ** 2 - sigma**2, 0.0))
        xs.update(c_x0=sqrt_ab[s], c_eps=direction, std=sigma)
    elif method == "dpmpp_2m":
        # x_s = (σ_s/σ_t) x_t + α_s (1 - e^{-h}) D with α_s e^{-h} = α_t σ_s / σ_t, h = λ_s - λ_t.
        ratio = sqrt_om[s] / sqrt_om[t]
        half_lam = schedule.log_snr / 2
        h = half_lam[s] - half_lam[t]
        h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, h.dtype), h[:-1]])
        xs.update(c_x=ratio, c_d=sqrt_ab[s] - sqrt_ab[t] * ratio, c_corr=h / (2 * h_prev))
    else:  # heun: in VP coordinates, x_s = (α_s/α_t) x_t + α_s (σ̃_s - σ̃_t) ε̂.
        sig = schedule.sqrt_recipm1_alpha_bars
        xs.update(c_x=sqrt_ab[s] / sqrt_ab[t], c_eps=sqrt_ab[s] * (sig[s] - sig[t]))
    if method == "ddpm" or (method == "ddim" and not (_is_concrete_number(eta) and eta == 0)):
        if per_example:  # [num_steps - 1, B]
            split = functools.partial(jax.random.split, num=num_steps - 1)
            xs["key"] = jax.vmap(split, out_axes=1)(key_steps)
        else:
            xs["key"] = jax.random.split(key_steps, num_steps - 1)
    return Plan(carry=(x, jnp.zeros_like(x) if method == "dpmpp_2m" else None), xs=xs)


def _predict(model_fn, schedule, x, t, prediction, clip_x0):
    """(x̂_0, ε̂) from one network evaluation at the scalar timestep ``t`` for the whole batch."""
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    out = model_fn(x, tb)
    if jnp.shape(out) != x.shape:
        raise ValueError(
            f"samplers: model_fn(x_t, t) must return an array shaped like x_t {x.shape}, "
            f"got {jnp.shape(out)}"
        )
    return diffusion.predict_x0_and_eps(schedule, out, x, tb, prediction, clip_x0)


def step(
    model_fn: ModelFn,
    schedule: Schedule,
    carry,
    xs_i: dict[str, jax.Array],
    *,
    method: str = "ddim",
    prediction: str = "eps",
    clip_x0: float | None = None,
):
    """One step t → s of a sampler: the body of the scan in :func:`sample`.

    Args:
        model_fn: ``model_fn(x_t, t) -> [B, ...]``.
        schedule: the noise schedule.
        carry: ``(x, aux)`` as in :class:`Plan`.
        xs_i: one row of :attr:`Plan.xs` (scalars).
        method: as in :func:`sample`.
        prediction: "eps", "x0" or "v".
        clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]`` (None: no clipping).

    Returns:
        ``(carry, x_s)`` with ``x_s`` ``[B, ...]`` the state at timestep ``s``.
    """
    _check_choice("method", method, METHODS)
    x, aux = carry
    predict = functools.partial(
        _predict, model_fn, schedule, prediction=prediction, clip_x0=clip_x0
    )
    x0, eps = predict(x, xs_i["t"])
    if method == "ddpm":
        x = xs_i["c1"] * x0 + xs_i["c2"] * x
    elif method == "ddim":
        x = xs_i["c_x0"] * x0 + xs_i["c_eps"] * eps
    elif method == "dpmpp_2m":
        d = x0 + xs_i["c_corr"] * (x0 - aux)  # (1 + 1/2r) D_i - 1/2r D_{i-1}; c_corr = 0 first
        x, aux = xs_i["c_x"] * x + xs_i["c_d"] * d, x0
    else:
        x_euler = xs_i["c_x"] * x + xs_i["c_eps"] * eps
        _, eps_next = predict(x_euler, xs_i["s"])
        x = xs_i["c_x"] * x + xs_i["c_eps"] * (0.5 * (eps + eps_next))
    if "key" in xs_i:
        if jnp.ndim(xs_i["key"]) == 1:  # one key per sample
            normal = lambda k: jax.random.normal(k, x.shape[1:], x.dtype)
            noise = jax.vmap(normal)(xs_i["key"])
        else:
            noise = jax.random.normal(xs_i["key"], x.shape, x.dtype)
        x = x + xs_i["std"] * noise
    return (x, aux), x


def finish(
    model_fn: ModelFn, schedule: Schedule, carry, *, prediction: str = "eps", clip_x0=None
) -> jax.Array:
    """The last update, from t = 0 to clean data (ᾱ = 1): returns x̂_0(x_0, t = 0), ``[B, ...]``."""
    x0, _ = _predict(model_fn, schedule, carry[0], 0, prediction, clip_x0)
    return x0


def _validate_plan(schedule, shape, method, num_steps, eta, spacing, variance, x_T) -> None:
    _check_choice("method", method, METHODS)
    if spacing is not None:
        _check_choice("timestep_spacing", spacing, SPACINGS)
    check_num_steps(num_steps, schedule.num_timesteps)
    _check_choice("variance", variance, diffusion.VARIANCES)
    if not (
        isinstance(shape, tuple)
        and len(shape) >= 2
        and all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape)
    ):
        raise ValueError(
            f"shape must be a tuple of positive ints (B, ...) with at least one axis after the "
            f"batch axis, e.g. (B, H, W, C) or (B, D), got {shape!r}"
        )
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    if _is_concrete_number(eta):
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if method != "ddim" and eta != 0:
            raise ValueError(f"eta is used only by method='ddim'; got eta={eta} with {method!r}")


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddim",
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    prediction: str = "eps",
    clip_x0: float | None = None,
    timestep_spacing: str | None = None,
    variance: str = "fixed_small",
    return_trajectory: bool = False,
    x_T: jax.Array | None = None,
):
    """Draws samples with one ``jax.lax.scan`` over the timestep grid of ``method``.

    Args:
        model_fn: ``model_fn(x_t, t) -> [B, ...]`` with ``x_t: [B, ...]`` and ``t: int32 [B]`` in
            [0, T); bind labels or context with a closure or ``functools.partial``.
        schedule: the noise schedule the model was trained with (traced).
        key: PRNG key for x_T (unless given) and the per-step noise; or ``[B]`` keys, one per
            sample, so that each sample is a function of its own key alone (not of the batch it
            is drawn in, nor of how the batch is sharded).
        shape: static ``(B, ...)`` of the samples, rank >= 2, e.g. ``(B, 32, 32, 3)`` or
            ``(B, D)``.
        method: "ddpm", "ddim", "dpmpp_2m" or "heun" (static; see the module docstring).
        num_steps: N, grid length in [2, T] (static). Model evaluations per sample are N, or
            2N - 1 for "heun" (:func:`num_model_evals`).
        eta: DDIM's η ≥ 0 (traced): σ_t = η √β̃ of the respaced step; 0 for any other method.
        prediction: what ``model_fn`` returns: "eps", "x0" or "v" (static).
        clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]`` at every step, e.g. 1.0 for images in
            [-1, 1] (static; None: no clipping).
        timestep_spacing: one of :data:`SPACINGS`, or None for the method's default
            (:data:`DEFAULT_SPACINGS`); see :func:`timesteps`.
        variance: "fixed_small" (β̃) or "fixed_large" (β), for "ddpm".
        return_trajectory: also return the states at every grid point (static).
        x_T: optional ``[*shape]`` starting state at ``t_0`` (default: N(0, I) drawn from ``key``).

    Returns:
        ``[*shape]`` float32 samples; with ``return_trajectory`` the tuple ``(samples,
        trajectory)``, ``trajectory: [N + 1, *shape]`` = x at t_0, …, t_{N-1} = 0, then the
        samples.

    Raises:
        ValueError: for an invalid method, spacing, num_steps, prediction, variance, shape, eta
            (a concrete value) or clip_x0, or a ``model_fn`` output not shaped like ``x_t``.
    """
    diffusion.check_prediction(prediction)
    if clip_x0 is not None and not (_is_concrete_number(clip_x0) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive number, got {clip_x0!r}")
    p = plan(
        schedule,
        key,
        shape,
        method=method,
        num_steps=num_steps,
        eta=eta,
        timestep_spacing=timestep_spacing,
        variance=variance,
        x_T=x_T,
    )
    body = functools.partial(
        step, model_fn, schedule, method=method, prediction=prediction, clip_x0=clip_x0
    )
    carry, states = jax.lax.scan(body, p.carry, p.xs)
    samples = finish(model_fn, schedule, carry, prediction=prediction, clip_x0=clip_x0)
    if not return_trajectory:
        return samples
    trajectory = jnp.concatenate([p.carry[0][None], states, samples[None]])
    return samples, trajectory
