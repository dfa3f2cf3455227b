"""Sampling grids: which training timesteps a sampler visits, ``t_0 > t_1 > … > t_{N-1} = 0``.

:func:`timesteps` spaces ``N`` distinct training timesteps evenly in index ("uniform",
"quadratic", "trailing") or in noise level ("logsnr", "karras"); the samplers
(:mod:`ddpm_jax.samplers`) step along these grids with the exact noise levels of the chosen
timesteps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

SPACINGS = ("uniform", "quadratic", "trailing", "logsnr", "karras")
KARRAS_RHO = 7.0


def check_num_steps(num_steps, num_timesteps: int) -> None:
    """Raises ValueError unless ``num_steps`` is a Python int in [2, T]."""
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be a Python int, got {num_steps!r}")
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [2, T={num_timesteps}] (a grid starts at a noisy timestep and "
            f"ends at t = 0), got {num_steps}"
        )


def _distinct_increasing(rounded, num_timesteps: int, xp=np):
    """Turns rounded increasing positions into distinct ints 0 = u_0 < u_1 < … < u_{N-1} < T.

    Positions that land on an earlier one move up by the fewest steps (u_j = max(r_j, u_{j-1} + 1)),
    then the top is pushed back under T (u_j = min(u_j, u_{j+1} - 1)); both sweeps are cumulative
    max / min, so this works for NumPy and traced ``jnp`` arrays (``xp``) alike.
    """
    n = rounded.shape[0]
    idx = xp.arange(n, dtype=np.int32)
    r = xp.clip(rounded, 0, num_timesteps - 1).astype(np.int32)
    r = xp.concatenate([xp.zeros((1,), np.int32), r[1:]])  # the grid ends at t = 0
    u = xp.maximum.accumulate(r - idx) + idx
    return xp.minimum(xp.minimum.accumulate((u - idx)[::-1])[::-1], num_timesteps - n) + idx


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _noise_level_grid(log_snr: jax.Array, num_steps: int, spacing: str, rho: float) -> jax.Array:
    """Increasing timesteps of the "logsnr" / "karras" grids (jitted once per static config)."""
    num_t = log_snr.shape[0]
    lam_max, lam_min = log_snr[0], log_snr[num_t - 1]
    ramp = jnp.linspace(0.0, 1.0, num_steps, dtype=jnp.float32)
    if spacing == "logsnr":
        lam = lam_max + ramp * (lam_min - lam_max)
    else:  # σ = √((1-ᾱ)/ᾱ) = exp(-λ / 2), interpolated in σ^(1/ρ)
        s_min, s_max = jnp.exp(-lam_max / (2 * rho)), jnp.exp(-lam_min / (2 * rho))
        lam = -2.0 * rho * jnp.log(s_min + ramp * (s_max - s_min))
    # The nearest training timestep in λ (i.e. in log σ).
    pos = jnp.argmin(jnp.abs(log_snr[None, :] - lam[:, None]), axis=1)
    return _distinct_increasing(pos, num_t, jnp)


def timesteps(
    schedule: Schedule, num_steps: int, spacing: str = "uniform", *, rho: float = KARRAS_RHO
) -> jax.Array:
    """The sampling grid: ``num_steps`` distinct training timesteps, decreasing, ending at 0.

    Spacings (T = ``schedule.num_timesteps``, N = ``num_steps``, i = 0 … N-1):

    - ``"uniform"``: ⌊i T / N⌋, evenly spaced over [0, T) (DDIM's "uniform" skip; for N | T it is
      ``range(0, T, T // N)``, diffusers' "leading").
    - ``"quadratic"``: ⌊(i √(0.8 T) / (N-1))²⌋, the grid DDIM used for CIFAR-10.
    - ``"trailing"``: round(i (T-1) / (N-1)); starts at the last training step T-1, as Lin et al.
      (2024) recommend (diffusers calls this "linspace"; its "trailing" stops at T/N - 1 instead
      of 0).
    - ``"logsnr"``: uniform in λ = log(ᾱ/(1-ᾱ)) between λ_{T-1} and λ_0 (DPM-Solver's grid).
    - ``"karras"``: σ_i = (σ_min^{1/ρ} + i/(N-1) (σ_max^{1/ρ} - σ_min^{1/ρ}))^ρ with σ = √((1-ᾱ)/ᾱ),
      σ_min = σ_0, σ_max = σ_{T-1} (Karras et al. 2022, Eq. 5).

    The noise-level grids are mapped to the nearest training timestep in λ (i.e. in log σ). Where
    several points land on one timestep (the log-SNR and Karras grids crowd near t = 0 when N is a
    sizeable fraction of T, and so does "quadratic"), the later ones move to the next free
    timesteps, so the grid is always strictly decreasing; with N = T every spacing is the full
    grid. The samplers use the exact noise levels of these integer timesteps, so the model and the
    solver agree on σ.

    Args:
        schedule: the noise schedule (its tables may be traced).
        num_steps: N, an int in [2, T].
        spacing: one of :data:`SPACINGS`.
        rho: ρ of the "karras" spacing.

    Returns:
        int32 ``[N]`` timesteps, strictly decreasing, ``[0] ≤ T - 1`` and ``[-1] == 0`` (a
        ``jax.Array``; a constant under ``jax.jit`` except for the noise-level grids).

    Raises:
        ValueError: for an unknown ``spacing`` or ``num_steps`` outside [2, T].
    """
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    num_t = schedule.num_timesteps
    check_num_steps(num_steps, num_t)
    if spacing in ("logsnr", "karras"):
        return _noise_level_grid(schedule.log_snr, int(num_steps), spacing, float(rho))[::-1]
    i = np.arange(num_steps, dtype=np.float64)
    if spacing == "uniform":
        pos = np.floor(i * num_t / num_steps)
    elif spacing == "quadratic":
        pos = np.floor((i * np.sqrt(0.8 * num_t) / (num_steps - 1)) ** 2)
    else:
        pos = np.round(i * (num_t - 1) / (num_steps - 1))
    return jnp.asarray(_distinct_increasing(pos, num_t)[::-1])


__all__ = ["KARRAS_RHO", "SPACINGS", "check_num_steps", "timesteps"]
