"""Samplers on an explicit grid: each step evaluates the model at a given timestep and moves to a
given noise level, so the steps of another implementation (diffusers' ``DDIMScheduler`` and
``DPMSolverMultistepScheduler``) are reproduced exactly.

:func:`ddpm_jax.samplers.sample` picks its own grid ``t_0 > … > t_{N-1} = 0`` and ends with the
prediction x̂_0 at t = 0. Here the caller gives the evaluations ``t[i]`` and the levels
``alpha_bar_to[i]`` reached after each step: diffusers' DDIM goes from t to ᾱ of ``t - T // N``
and ends at ᾱ_0 when ``set_alpha_to_one`` is false; its DPM-Solver++(2M) goes to the next grid
point and ends at σ = 0 (ᾱ = 1) with a first-order step. The step itself is
:func:`ddpm_jax.samplers.step`, so the update rules are the same code as the default samplers'::

    x0 = sampler_grid.sample_on_grid(model_fn, schedule, x_T, t, alpha_bar_to, method="ddim")
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.samplers import ModelFn, Plan, step
from ddpm_jax.schedules import Schedule

GRID_METHODS = ("ddim", "dpmpp_2m")


def plan_on_grid(
    schedule: Schedule,
    t: jax.Array,
    alpha_bar_to: jax.Array,
    x_T: jax.Array,
    *,
    method: str = "ddim",
    eta: float | jax.Array = 0.0,
    key: jax.Array | None = None,
) -> Plan:
    """A :class:`~ddpm_jax.samplers.Plan` whose every row is one evaluation and one step.

    Args:
        schedule: the noise schedule.
        t: int ``[N]`` timesteps of the evaluations, in [0, T).
        alpha_bar_to: float ``[N]`` ᾱ after each step (1.0: clean data).
        x_T: ``[B, ...]`` the state at ``t[0]``.
        method: "ddim" or "dpmpp_2m" (its first step, and a step to ᾱ = 1, are first order).
        eta: DDIM's η (Song et al. Eq. 16 on the step t → alpha_bar_to); η > 0 needs ``key``.
        key: ``[B]`` PRNG keys, one per sample, for DDIM's noise (unused with η = 0).

    Returns:
        The plan; :func:`sample_on_grid` scans :func:`ddpm_jax.samplers.step` over it.

    Raises:
        ValueError: another method, grids of different shapes, or η > 0 without keys.
    """
    if method not in GRID_METHODS:
        raise ValueError(f"method must be one of {GRID_METHODS}, got {method!r}")
    t, ab_s = jnp.asarray(t, jnp.int32), jnp.asarray(alpha_bar_to, jnp.float32)
    if t.ndim != 1 or ab_s.shape != t.shape:
        raise ValueError(f"t {t.shape} and alpha_bar_to {ab_s.shape} must be [N] arrays")
    x = jnp.asarray(x_T, jnp.float32)
    ab_t = schedule.alpha_bars[t]
    xs: dict[str, jax.Array] = {"t": t, "s": t}
    if method == "ddim":
        var = (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s)
        sigma = jnp.asarray(eta, jnp.float32) * jnp.sqrt(var)
        direction = jnp.sqrt(jnp.maximum(1.0 - ab_s - sigma**2, 0.0))
        xs.update(c_x0=jnp.sqrt(ab_s), c_eps=direction, std=sigma)
        concrete = isinstance(eta, (int, float, np.number)) and not isinstance(eta, bool)
        if not (concrete and eta == 0):
            if key is None or key.shape != x.shape[:1]:
                raise ValueError(f"eta > 0 needs key: {x.shape[0]} PRNG keys, one per sample")
            split = functools.partial(jax.random.split, num=t.shape[0])
            xs["key"] = jax.vmap(split, out_axes=1)(key)  # [N, B]
        return Plan(carry=(x, None), xs=xs)
    # DPM-Solver++(2M): x_s = (σ_s/σ_t) x_t + α_s (1 - e^{-h}) D, h = λ_s - λ_t (half log-SNR).
    ratio = jnp.sqrt((1.0 - ab_s) / (1.0 - ab_t))
    h = 0.5 * (jnp.log(ab_s) - jnp.log1p(-ab_s) - jnp.log(ab_t) + jnp.log1p(-ab_t))
    h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, h.dtype), h[:-1]])
    c_corr = jnp.where(jnp.isfinite(h), h / (2 * h_prev), 0.0)
    xs.update(c_x=ratio, c_d=jnp.sqrt(ab_s) - jnp.sqrt(ab_t) * ratio, c_corr=c_corr)
    return Plan(carry=(x, jnp.zeros_like(x)), xs=xs)


def sample_on_grid(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    t: jax.Array,
    alpha_bar_to: jax.Array,
    *,
    method: str = "ddim",
    eta: float | jax.Array = 0.0,
    key: jax.Array | None = None,
    prediction: str = "eps",
    clip_x0: float | None = None,
) -> jax.Array:
    """Runs :func:`plan_on_grid` as one ``jax.lax.scan`` of :func:`ddpm_jax.samplers.step`.

    Args:
        model_fn: ``model_fn(x_t, t) -> [B, ...]`` (``t``: int32 [B]).
        schedule, t, alpha_bar_to, x_T, method, eta, key: as in :func:`plan_on_grid`.
        prediction: what ``model_fn`` returns: "eps", "x0" or "v".
        clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]`` (None: no clipping).

    Returns:
        ``[B, ...]`` float32: the state after the last step (x̂_0 when ``alpha_bar_to[-1] == 1``).
    """
    diffusion.check_prediction(prediction)
    p = plan_on_grid(schedule, t, alpha_bar_to, x_T, method=method, eta=eta, key=key)
    body = functools.partial(
        step, model_fn, schedule, method=method, prediction=prediction, clip_x0=clip_x0
    )
    return jax.lax.scan(body, p.carry, p.xs)[0][0]


__all__ = ["GRID_METHODS", "plan_on_grid", "sample_on_grid"]
