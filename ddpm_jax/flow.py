"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3).

Time convention, kept throughout (that of diffusers' ``FlowMatchEulerDiscreteScheduler``):
``t = 0`` is data, ``t = 1`` is noise, and

    x_t = (1 - t) x_0 + t ε,        v = dx_t/dt = ε - x_0.

The network's contract is ``velocity_fn(x_t, t, **cond) -> v̂`` with ``x_t: [B, ...]`` and ``t``
float ``[B]`` in [0, 1] (multiply by 1000 inside the closure for networks trained on SD3's
``timestep = 1000 t``). Sampling integrates dx/dt = v̂ from t = 1 down to t = 0. Classifier-free
guidance is :func:`ddpm_jax.guidance.classifier_free` applied to ``velocity_fn`` (v is affine in
the network output).

- :func:`interpolate`, :func:`loss`: the conditional flow matching loss
  E_t,ε ||v̂(x_t, t) - (ε - x_0)||² with t uniform or logit-normal (SD3's default
  ``logit_normal(0, 1)``), optionally shifted: t ↦ s t / (1 + (s - 1) t) (:func:`time_shift`).
- :func:`timesteps`: diffusers' inference grid for ``FlowMatchEulerDiscreteScheduler(shift=s)``.
- :func:`sample`: Euler (N velocity calls) or Heun (2N) over a grid, one ``jax.lax.scan``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion

METHODS = ("euler", "heun")
T_DISTRIBUTIONS = ("uniform", "logit_normal")
REDUCTIONS = ("mean", "none")

VelocityFn = Callable[..., jax.Array]


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _expand(values: jax.Array, x: jax.Array) -> jax.Array:
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def time_shift(t: jax.Array, shift: float | jax.Array = 1.0) -> jax.Array:
    """SD3's timestep shift (Esser et al. 2024, Eq. 23): s t / (1 + (s - 1) t); s = 1 is identity.

    Larger s moves t toward 1 (more noise), as high resolutions need. Any shape; traced ``shift``.
    """
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t ε.

    Args:
        x0: ``[B, ...]`` data.
        noise: ε, ``[B, ...]`` standard normal.
        t: float ``[B]`` (or a scalar) in [0, 1].

    Returns:
        ``[B, ...]`` x_t in ``x0.dtype``.
    """
    batch = diffusion.check_data("flow.interpolate", x0=x0, noise=noise)
    t = jnp.broadcast_to(jnp.asarray(t, x0.dtype), (batch,))
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise.astype(x0.dtype)


def sample_t(
    key: jax.Array,
    shape: tuple[int, ...] = (),
    *,
    distribution: str = "uniform",
    mean: float | jax.Array = 0.0,
    std: float | jax.Array = 1.0,
    shift: float | jax.Array = 1.0,
) -> jax.Array:
    """Training times: ``"uniform"`` t ~ U(0, 1) or ``"logit_normal"`` t = sigmoid(m + s n),
    n ~ N(0, 1) (SD3, Eq. 19), then :func:`time_shift` by ``shift`` (traced). float32 ``shape``."""
    _check_choice("distribution", distribution, T_DISTRIBUTIONS)
    if distribution == "uniform":
        t = jax.random.uniform(key, shape, jnp.float32)
    else:
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    return time_shift(t, shift)


def sample_t_and_noise(
    key: jax.Array, x0: jax.Array, **distribution_kwargs
) -> tuple[jax.Array, jax.Array]:
    """t ~ :func:`sample_t` per example and ε ~ N(0, I) shaped like ``x0``.

    Args:
        key: one PRNG key, or ``[B]`` keys, one per example (example b's t and ε are then a
            function of ``key[b]`` alone).
        x0: ``[B, ...]`` data (its shape and dtype are used).
        **distribution_kwargs: :func:`sample_t`'s keyword arguments.

    Returns:
        ``(t, noise)``: float32 ``[B]`` and ``[B, ...]`` in ``x0.dtype``.
    """
    batch = diffusion.check_data("flow.sample_t_and_noise", x0=x0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        k_t, k_noise = jax.random.split(key)
        t = sample_t(k_t, (batch,), **distribution_kwargs)
        return t, jax.random.normal(k_noise, x0.shape, x0.dtype)
    if key.shape != (batch,):
        raise ValueError(f"key: {key.shape} keys for a batch of {batch}")

    def one(k):
        k_t, k_noise = jax.random.split(k)
        t = sample_t(k_t, (), **distribution_kwargs)
        return t, jax.random.normal(k_noise, x0.shape[1:], x0.dtype)

    return jax.vmap(one)(key)


def loss(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    reduction: str = "mean",
    cond: dict | None = None,
) -> jax.Array:
    """Conditional flow matching loss: mean over non-batch dims of (v̂(x_t, t) - (ε - x_0))².

    Args:
        velocity_fn: ``velocity_fn(x_t, t, **cond) -> [B, ...]``.
        x0: ``[B, ...]`` data.
        t: float ``[B]`` times in [0, 1].
        noise: ε, ``[B, ...]``.
        reduction: "mean" for a scalar, "none" for float32 ``[B]``.
        cond: extra keyword arguments for ``velocity_fn``.

    Returns:
        float32 scalar or ``[B]``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    batch = diffusion.check_data("flow.loss", x0=x0, noise=noise)
    t = jnp.asarray(t, jnp.float32)
    if t.shape != (batch,):
        raise ValueError(f"flow.loss: t must be float [B] = ({batch},), got {t.shape}")
    out = velocity_fn(interpolate(x0, noise, t), t, **(cond or {}))
    if jnp.shape(out) != x0.shape:
        raise ValueError(f"flow.loss: velocity_fn must return {x0.shape}, got {jnp.shape(out)}")
    target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
    sq = jnp.square(out.astype(jnp.float32) - target)
    per_example = jnp.mean(sq.reshape(batch, -1), axis=1)
    return per_example if reduction == "none" else jnp.mean(per_example)


def loss_with_key(
    velocity_fn: VelocityFn,
    key: jax.Array,
    x0: jax.Array,
    *,
    distribution: str = "uniform",
    mean: float | jax.Array = 0.0,
    std: float | jax.Array = 1.0,
    shift: float | jax.Array = 1.0,
    **kwargs,
) -> jax.Array:
    """:func:`loss` with t and ε drawn from ``key`` (one key or ``[B]`` keys; see
    :func:`sample_t_and_noise`). Other keyword arguments go to :func:`loss`."""
    t, noise = sample_t_and_noise(
        key, x0, distribution=distribution, mean=mean, std=std, shift=shift
    )
    return loss(velocity_fn, x0, t, noise, **kwargs)


def timesteps(num_steps: int, shift: float = 1.0, *, num_train_timesteps: int = 1000) -> jax.Array:
    """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)``, then 0.

    diffusers spaces ``num_steps`` times evenly from t_max = 1 to t_min = time_shift(1/T_train) and
    shifts them (so t_min is shifted twice, as there): t_i = time_shift(1 + i/(N-1) (t_min - 1)).
    Computed in float64, returned as float32.

    Args:
        num_steps: N ≥ 1 (static).
        shift: SD3's shift s > 0 (3.0 for SD3; 1.0: none).
        num_train_timesteps: diffusers' ``num_train_timesteps``.

    Returns:
        float32 ``[N + 1]``, decreasing from 1 to 0.
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t_min = time_shift(1.0 / num_train_timesteps, shift)
    t = time_shift(np.linspace(1.0, t_min, num_steps, dtype=np.float64), shift)
    return jnp.asarray(np.append(t, 0.0), jnp.float32)


def _step(velocity_fn, x, ts, *, method):
    t, t_next = ts
    batch = x.shape[0]
    call = lambda y, s: velocity_fn(y, jnp.full((batch,), s, x.dtype))
    v = call(x, t)
    if jnp.shape(v) != x.shape:
        raise ValueError(f"flow.sample: velocity_fn must return {x.shape}, got {jnp.shape(v)}")
    h = t_next - t
    x_euler = x + h * v
    if method == "euler":
        return x_euler
    return x + h * (0.5 * (v + call(x_euler, t_next)))


def sample(
    velocity_fn: VelocityFn,
    x: jax.Array,
    timesteps: jax.Array,
    *,
    method: str = "euler",
    return_trajectory: bool = False,
):
    """Integrates dx/dt = v̂(x, t) along ``timesteps`` (from noise at t_0 toward data).

    Euler: x_{i+1} = x_i + (t_{i+1} - t_i) v̂(x_i, t_i) (diffusers' FlowMatchEuler step); Heun adds
    the trapezoidal correction with v̂(x_{i+1}, t_{i+1}) at every step (the velocity is finite at
    t = 0, so the last step is Heun's too).

    Args:
        velocity_fn: ``velocity_fn(x_t, t) -> [B, ...]``; called with t ``[B]`` in x's dtype.
        x: ``[B, ...]`` the start at t_0 (ε ~ N(0, I) for t_0 = 1).
        timesteps: ``[N + 1]`` times (traced), e.g. :func:`timesteps`.
        method: "euler" (N velocity calls) or "heun" (2N).
        return_trajectory: also return x at every t_i, ``[N + 1, B, ...]``.

    Returns:
        ``[B, ...]`` at t_N, or ``(samples, trajectory)``.
    """
    _check_choice("method", method, METHODS)
    diffusion.check_data("flow.sample", x=x)
    ts = jnp.asarray(timesteps, x.dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"flow.sample: timesteps must be [N + 1] with N >= 1, got {ts.shape}")
    run = functools.partial(_step, velocity_fn, method=method)

    def body(carry, ts_i):
        new = run(carry, ts_i)
        return new, new

    out, states = jax.lax.scan(body, x, (ts[:-1], ts[1:]))
    if not return_trajectory:
        return out
    return out, jnp.concatenate([x[None], states])
