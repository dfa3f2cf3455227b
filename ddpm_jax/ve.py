"""Variance exploding (VE) views of discrete schedules: the geometric VE schedule, σ grids, and
an adapter that turns a discrete-time ε / x_0 / v ``model_fn`` into an EDM denoiser.

A VP state x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and the VE state x = x_t / √ᾱ_t = x_0 + σ_t ε carry the
same information, with σ_t = √((1-ᾱ_t)/ᾱ_t) (``schedule.sqrt_recipm1_alpha_bars``) and
ᾱ_t = 1/(1 + σ_t²). So a VE schedule is a :class:`~ddpm_jax.schedules.Schedule` like any other
(:func:`geometric` builds its tables from σ_t): the training loss, the samplers of
:mod:`ddpm_jax.samplers` and guidance take it unchanged, and a network trained on it sees the
bounded input x_t = x / √(1 + σ_t²) (EDM's c_in of VP). For :func:`ddpm_jax.edm.sample`, use
:func:`sigma_grid` for the noise levels and :func:`denoiser` for the network.

The σ of EDM's continuous VP schedule (:func:`vp_sigma`) and of improved DDPM
(:func:`iddpm_sigmas`) serve :mod:`ddpm_jax.edm`'s preconditionings and σ distributions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, schedules
from ddpm_jax.schedules import Schedule

TIMESTEP_MAPPINGS = ("nearest", "fractional")

# EDM's Table 1: VP (Song et al. 2021) and iDDPM (Nichol & Dhariwal 2021) constants, as in its code.
VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, VP_M = 19.9, 0.1, 1e-5, 1000
IDDPM_C1, IDDPM_C2, IDDPM_M = 0.001, 0.008, 1000


def geometric(
    num_timesteps: int = 1000, sigma_min: float = 0.01, sigma_max: float = 50.0
) -> Schedule:
    """The VE schedule of SMLD / NCSN++ (Song & Ermon 2019; Song et al. 2021): geometric σ_t.

    σ_t = σ_min (σ_max / σ_min)^{t/(T-1)} for t = 0 … T-1 (the defaults are score_sde's CIFAR-10
    values), stored as the equivalent VP tables ᾱ_t = 1/(1 + σ_t²), β_t = 1 - ᾱ_t/ᾱ_{t-1}, all
    computed in float64; ``sqrt_recipm1_alpha_bars`` is σ_t.

    Args:
        num_timesteps: T ≥ 2.
        sigma_min: σ_0 > 0.
        sigma_max: σ_{T-1} > σ_min.

    Returns:
        The schedule.

    Raises:
        ValueError: for T < 2 or not 0 < σ_min < σ_max.
    """
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    sigma = np.geomspace(sigma_min, sigma_max, int(num_timesteps), dtype=np.float64)
    log_ab = -np.log1p(sigma**2)  # log ᾱ_t
    betas = -np.expm1(np.diff(log_ab, prepend=0.0))  # 1 - ᾱ_t / ᾱ_{t-1}
    return schedules.from_betas(betas)


def vp_sigma(t):
    """σ(t) = √(exp(½ β_d t² + β_min t) - 1) of the VP SDE (Table 1), t ∈ (0, 1]."""
    return jnp.sqrt(jnp.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t))


def vp_sigma_inv(sigma):
    """t(σ) = (√(β_min² + 2 β_d log(1 + σ²)) - β_min) / β_d, the inverse of :func:`vp_sigma`."""
    root = jnp.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * jnp.log1p(sigma**2))
    return (root - VP_BETA_MIN) / VP_BETA_D


@functools.cache
def iddpm_sigmas() -> np.ndarray:
    """The noise levels u_0 > … > u_{M-1} of improved DDPM (EDM Table 1), float64 ``[M]``.

    u_M = 0 and u_{j-1} = √((u_j² + 1) / max(ᾱ(j-1)/ᾱ(j), C_1) - 1) with
    ᾱ(j) = sin²(π j / (2 M (1 + C_2))). (EDM computes the same recursion in float32.)
    """
    m = IDDPM_M
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / m / (IDDPM_C2 + 1)) ** 2
    u = np.zeros(m + 1)
    for j in range(m, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), IDDPM_C1) - 1)
    return u[:m]


def sigmas(schedule: Schedule) -> jax.Array:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) of every timestep, float32 ``[T]``, increasing."""
    return schedule.sqrt_recipm1_alpha_bars


def sigma_grid(schedule: Schedule, timesteps: jax.Array) -> jax.Array:
    """The σ grid of ``edm.sample`` visiting the given timesteps and then σ = 0.

    With the last timestep 0, the final (Euler) step returns D at t = 0, as the samplers'
    :func:`~ddpm_jax.samplers.finish` does.

    Args:
        schedule: the noise schedule.
        timesteps: int ``[N]`` decreasing timesteps, e.g. :func:`ddpm_jax.spacing.timesteps`.

    Returns:
        float32 ``[N + 1]``: σ at each timestep, then 0.
    """
    t = jnp.asarray(timesteps)
    if t.ndim != 1 or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"timesteps must be an int [N] array, got {t.dtype} {t.shape}")
    return jnp.concatenate([sigmas(schedule)[t], jnp.zeros((1,), jnp.float32)])


def timestep_of_sigma(schedule: Schedule, sigma: jax.Array, mapping: str = "nearest") -> jax.Array:
    """The training timestep whose σ_t matches ``sigma``.

    ``"nearest"``: the t of the nearest σ_t in log σ (int32; EDM's iDDPM wrapper rounds in σ, the
    samplers' grids in log σ). ``"fractional"``: t interpolated linearly in log σ between the two
    neighbours (float32; EDM's VP wrapper feeds a continuous t(σ) to the network likewise). Both
    clamp to [0, T - 1] outside [σ_0, σ_{T-1}].

    Args:
        schedule: the noise schedule.
        sigma: float ``[B]`` noise levels.
        mapping: one of :data:`TIMESTEP_MAPPINGS`.

    Returns:
        int32 (nearest) or float32 (fractional) ``[B]``.
    """
    if mapping not in TIMESTEP_MAPPINGS:
        raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {mapping!r}")
    log_table = jnp.log(sigmas(schedule))
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
    if mapping == "nearest":
        return jnp.argmin(jnp.abs(log_sigma[:, None] - log_table[None, :]), axis=1).astype(
            jnp.int32
        )
    index = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
    return jnp.interp(log_sigma, log_table, index)


def denoiser(
    model_fn: Callable[..., jax.Array],
    schedule: Schedule,
    *,
    prediction: str = "eps",
    timestep_mapping: str = "nearest",
) -> Callable[..., jax.Array]:
    """Turns a discrete-time ``model_fn(x_t, t, **cond)`` into an EDM denoiser D(x; σ).

    The VE state x at σ is the VP state x_t = x / √(1 + σ²) (ᾱ = 1/(1 + σ²)); the network runs at
    the timestep of σ (:func:`timestep_of_sigma`), and its output becomes x̂_0 with the σ given:
    ``"eps"``: D = x - σ ε̂ (EDM's VP / iDDPM preconditioning), ``"x0"``: D = x̂_0,
    ``"v"``: D = x/(1 + σ²) - σ v̂/√(1 + σ²). On the σ_t of training timesteps (:func:`sigma_grid`)
    this is exactly the model's x̂_0 there, so ``edm.sample(method="euler")`` over the σ of a grid
    reproduces deterministic DDIM on that grid; off the grid (the churn's σ̂) the nearest timestep
    stands in, as in EDM's iDDPM sampler.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> [B, ...]`` (t int32 ``[B]``; float32 ``[B]`` with
            ``timestep_mapping="fractional"``, which our UNet and diffusers' accept).
        schedule: the schedule the model was trained with.
        prediction: "eps", "x0" or "v".
        timestep_mapping: "nearest" or "fractional".

    Returns:
        ``denoise_fn(x, sigma, **cond) -> [B, ...]``, sigma a scalar or ``[B]``.
    """
    diffusion.check_prediction(prediction)
    if timestep_mapping not in TIMESTEP_MAPPINGS:
        raise ValueError(
            f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}"
        )

    def denoise_fn(x: jax.Array, sigma: jax.Array, **cond) -> jax.Array:
        batch = diffusion.check_data("ve.denoiser", x=x)
        sigma = jnp.asarray(sigma, x.dtype)
        if sigma.shape not in ((), (batch,)):
            raise ValueError(f"ve.denoiser: sigma must be a scalar or [B], got {sigma.shape}")
        sigma = jnp.broadcast_to(sigma, (batch,))
        t = timestep_of_sigma(schedule, sigma, timestep_mapping)
        s = sigma.reshape((batch,) + (1,) * (x.ndim - 1))
        c_in = jax.lax.rsqrt(1 + s**2)
        out = model_fn(c_in * x, t, **cond)
        if jnp.shape(out) != x.shape:
            raise ValueError(f"ve.denoiser: model_fn must return {x.shape}, got {jnp.shape(out)}")
        out = out.astype(x.dtype)
        if prediction == "eps":
            return x - s * out
        if prediction == "x0":
            return out
        return c_in**2 * x - s * c_in * out

    return denoise_fn
