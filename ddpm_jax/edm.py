"""EDM (Karras et al. 2022): noise levels, preconditioning, the denoising loss and the sampler.

Everything here lives in the variance exploding coordinates of the paper: x = x_0 + σ n with
n ~ N(0, I), and the network's one contract is the denoiser

    denoise_fn(x, sigma, **cond) -> D(x; σ)   # x: [B, ...]; sigma: scalar or [B]; D ≈ E[x_0 | x]

whose probability-flow ODE is dx/dσ = (x - D(x; σ)) / σ (Eq. 3 with σ(t) = t). A network
``net_fn(x_in, c_noise, **cond) -> F`` becomes a denoiser through :func:`denoiser`, which applies
a preconditioning of Table 1 (:func:`precondition`); a discrete-time ε / x_0 / v ``model_fn`` of
this package (or a loaded ``google/ddpm-*`` pipeline) becomes one through
:func:`ddpm_jax.ve.denoiser`. Classifier-free guidance is :func:`ddpm_jax.guidance.classifier_free`
applied to ``denoise_fn`` (D is affine in ε, so guiding D guides ε).

- :func:`sigma_steps`: the time steps of Eq. 5 (ρ = 7), ``num_steps + 1`` values ending in 0.
- :func:`loss`: E_σ,n λ(σ) ||D(x_0 + σ n; σ) - x_0||² (Eq. 2 / Table 1) with the log-normal σ of
  EDM or the σ distributions of VP and VE (:func:`sample_sigma`), per-example keys allowed.
- :func:`sample`: Algorithm 2 (Heun with Euler at the last step to σ = 0, optional churn), or
  Euler, as one ``jax.lax.scan``; ``2N - 1`` (Heun) or ``N`` (Euler) denoiser calls for N steps.

Hyper-parameters other than the choice of method / preconditioning / distribution are traced:
under ``jax.jit`` new values do not recompile::

    sigmas, sample_fn = edm.sigma_steps(18), jax.jit(functools.partial(edm.sample, denoise_fn))
    x = sample_fn(sigmas[0] * jax.random.normal(key, shape), sigmas)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, ve

PRECONDITIONINGS = ("edm", "vp", "ve", "iddpm")
SIGMA_DISTRIBUTIONS = ("lognormal", "ve", "vp")
WEIGHTINGS = ("edm", "snr", "uniform")
METHODS = ("heun", "euler")
REDUCTIONS = ("mean", "none")

DenoiseFn = Callable[..., jax.Array]


def _concrete(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def sigma_steps(
    num_steps: int,
    sigma_min: float | jax.Array = 0.002,
    sigma_max: float | jax.Array = 80.0,
    rho: float | jax.Array = 7.0,
    *,
    dtype=jnp.float32,
) -> jax.Array:
    """EDM's time steps (Eq. 5), ``num_steps + 1`` values ending in 0.

    σ_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ for i = 0 … N-1, then σ_N = 0.

    Args:
        num_steps: N ≥ 1 (static); N = 1 gives ``[σ_max, 0]``.
        sigma_min: σ_{N-1}, the last non-zero level (traced).
        sigma_max: σ_0 (traced).
        rho: ρ (traced); 7 in the paper, 1 is uniform in σ.
        dtype: result dtype (float64 needs ``jax_enable_x64``).

    Returns:
        ``[N + 1]`` decreasing noise levels, the last one 0.
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if _concrete(sigma_min) and _concrete(sigma_max) and not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if _concrete(rho) and not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = jnp.linspace(0.0, 1.0, num_steps, dtype=dtype)
    inv_rho = 1.0 / jnp.asarray(rho, dtype)
    lo, hi = jnp.asarray(sigma_min, dtype) ** inv_rho, jnp.asarray(sigma_max, dtype) ** inv_rho
    sigmas = (hi + ramp * (lo - hi)) ** jnp.asarray(rho, dtype)
    return jnp.concatenate([sigmas, jnp.zeros((1,), dtype)])


class Preconditioning(NamedTuple):
    """D(x; σ) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7); each field shaped like σ."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def precondition(
    sigma: jax.Array, sigma_data: float | jax.Array = 0.5, *, kind: str = "edm"
) -> Preconditioning:
    """The preconditioning of Table 1 (Karras et al. 2022) at noise level σ.

    - ``"edm"``: c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
      c_noise = ln(σ)/4.
    - ``"vp"``: c_skip = 1, c_out = -σ, c_in = 1/√(σ² + 1), c_noise = (M - 1) t(σ) (F predicts ε
      from the VP input x/√(1 + σ²); t(σ) is :func:`ddpm_jax.ve.vp_sigma_inv`, M = 1000).
    - ``"ve"``: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2).
    - ``"iddpm"``: as "vp" with c_noise = M - 1 - j, j the index of the nearest u_j
      (:func:`ddpm_jax.ve.iddpm_sigmas`); EDM's sampler also rounds σ to the u_j first.

    Args:
        sigma: σ > 0, any shape (usually a scalar or ``[B]``).
        sigma_data: σ_d, the data's standard deviation ("edm" only; traced).
        kind: one of :data:`PRECONDITIONINGS`.

    Returns:
        :class:`Preconditioning`, fields shaped like ``sigma``.
    """
    _check_choice("kind", kind, PRECONDITIONINGS)
    sigma = jnp.asarray(sigma)
    if not jnp.issubdtype(sigma.dtype, jnp.floating):
        sigma = sigma.astype(jnp.float32)
    one = jnp.ones_like(sigma)
    if kind == "edm":
        sd = jnp.asarray(sigma_data, sigma.dtype)
        c_in = jax.lax.rsqrt(sigma**2 + sd**2)
        return Preconditioning(sd**2 * c_in**2, sigma * sd * c_in, c_in, jnp.log(sigma) / 4)
    if kind == "ve":
        return Preconditioning(one, sigma, one, jnp.log(0.5 * sigma))
    c_in = jax.lax.rsqrt(sigma**2 + 1)
    if kind == "vp":
        c_noise = (ve.VP_M - 1) * ve.vp_sigma_inv(sigma)
    else:
        u = jnp.asarray(ve.iddpm_sigmas(), sigma.dtype)
        j = jnp.argmin(jnp.abs(sigma[..., None] - u), axis=-1)
        c_noise = (ve.IDDPM_M - 1 - j).astype(sigma.dtype)
    return Preconditioning(one, -sigma, c_in, c_noise)


def _batch_sigma(where: str, sigma, batch: int, dtype) -> jax.Array:
    """σ as ``[B]`` in ``dtype`` (a scalar is broadcast)."""
    sigma = jnp.asarray(sigma, dtype)
    if sigma.shape not in ((), (batch,)):
        raise ValueError(f"{where}: sigma must be a scalar or [B] = ({batch},), got {sigma.shape}")
    return jnp.broadcast_to(sigma, (batch,))


def _expand(values: jax.Array, x: jax.Array) -> jax.Array:
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def denoiser(
    net_fn: Callable[..., jax.Array], *, sigma_data: float | jax.Array = 0.5, kind: str = "edm"
) -> DenoiseFn:
    """Wraps a network F into the denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise).

    Args:
        net_fn: ``net_fn(x_in, c_noise, **cond) -> [B, ...]``, ``c_noise`` float ``[B]``.
        sigma_data: σ_d of the "edm" preconditioning.
        kind: one of :data:`PRECONDITIONINGS` (see :func:`precondition`).

    Returns:
        ``denoise_fn(x, sigma, **cond) -> [B, ...]``, sigma a scalar or ``[B]``.
    """
    _check_choice("kind", kind, PRECONDITIONINGS)

    def denoise_fn(x: jax.Array, sigma: jax.Array, **cond) -> jax.Array:
        batch = diffusion.check_data("edm.denoiser", x=x)
        c = precondition(_batch_sigma("edm.denoiser", sigma, batch, x.dtype), sigma_data, kind=kind)
        out = net_fn(_expand(c.c_in, x) * x, c.c_noise, **cond)
        if jnp.shape(out) != x.shape:
            raise ValueError(f"edm.denoiser: net_fn must return {x.shape}, got {jnp.shape(out)}")
        return _expand(c.c_skip, x) * x + _expand(c.c_out, x) * out.astype(x.dtype)

    return denoise_fn


def sample_sigma(
    key: jax.Array,
    shape: tuple[int, ...] = (),
    *,
    distribution: str = "lognormal",
    p_mean: float | jax.Array = -1.2,
    p_std: float | jax.Array = 1.2,
    sigma_min: float | jax.Array = 0.02,
    sigma_max: float | jax.Array = 100.0,
) -> jax.Array:
    """Training noise levels σ of Table 1.

    - ``"lognormal"`` (EDM): ln σ ~ N(P_mean, P_std²).
    - ``"ve"``: σ = σ_min (σ_max/σ_min)^u, u ~ U(0, 1) (log-uniform, σ in [0.02, 100] by default).
    - ``"vp"``: σ = :func:`ddpm_jax.ve.vp_sigma`(t), t ~ U(ε_t, 1), ε_t = 10⁻⁵.

    Args:
        key: a PRNG key.
        shape: the shape of the draw.
        distribution: one of :data:`SIGMA_DISTRIBUTIONS`.
        p_mean, p_std: of "lognormal" (traced).
        sigma_min, sigma_max: of "ve" (traced).

    Returns:
        float32 σ of ``shape``.
    """
    _check_choice("distribution", distribution, SIGMA_DISTRIBUTIONS)
    if distribution == "lognormal":
        return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))
    u = jax.random.uniform(key, shape, jnp.float32)
    if distribution == "ve":
        return sigma_min * (jnp.asarray(sigma_max, jnp.float32) / sigma_min) ** u
    return ve.vp_sigma(1.0 + u * (ve.VP_EPSILON_T - 1.0))


def sample_sigma_and_noise(
    key: jax.Array, x0: jax.Array, **distribution_kwargs
) -> tuple[jax.Array, jax.Array]:
    """σ ~ :func:`sample_sigma` per example and n ~ N(0, I) shaped like ``x0``.

    Args:
        key: one PRNG key, or ``[B]`` keys, one per example: then example b's σ and noise are a
            function of ``key[b]`` alone (as the training step's per-example keys).
        x0: ``[B, ...]`` clean data (its shape and dtype are used).
        **distribution_kwargs: :func:`sample_sigma`'s keyword arguments.

    Returns:
        ``(sigma, noise)``: float32 ``[B]`` and ``[B, ...]`` in ``x0.dtype``.
    """
    batch = diffusion.check_data("edm.sample_sigma_and_noise", x0=x0)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        k_sigma, k_noise = jax.random.split(key)
        sigma = sample_sigma(k_sigma, (batch,), **distribution_kwargs)
        return sigma, jax.random.normal(k_noise, x0.shape, x0.dtype)
    if key.shape != (batch,):
        raise ValueError(f"key: {key.shape} keys for a batch of {batch}")

    def one(k):
        k_sigma, k_noise = jax.random.split(k)
        sigma = sample_sigma(k_sigma, (), **distribution_kwargs)
        return sigma, jax.random.normal(k_noise, x0.shape[1:], x0.dtype)

    return jax.vmap(one)(key)


def loss_weights(
    sigma: jax.Array, weighting: str = "edm", sigma_data: float | jax.Array = 0.5
) -> jax.Array:
    """λ(σ): ``"edm"`` (σ² + σ_d²)/(σ σ_d)², ``"snr"`` 1/σ² (VP and VE), ``"uniform"`` 1.

    With the matching preconditioning, λ(σ) c_out(σ)² = 1: the loss of F has unit weight.
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return 1.0 / sigma**2 if weighting == "snr" else jnp.ones_like(sigma)


def loss(
    denoise_fn: DenoiseFn,
    x0: jax.Array,
    sigma: jax.Array,
    noise: jax.Array,
    *,
    sigma_data: float | jax.Array = 0.5,
    weighting: str = "edm",
    reduction: str = "mean",
    cond: dict | None = None,
) -> jax.Array:
    """EDM's denoising loss (Eq. 2, 8) for given σ and noise.

    L = λ(σ) · mean over non-batch dims of (D(x_0 + σ n; σ) - x_0)² (EDM sums over the pixels; the
    mean divides that by their number).

    Args:
        denoise_fn: ``denoise_fn(x, sigma, **cond) -> [B, ...]``, e.g. :func:`denoiser`.
        x0: ``[B, ...]`` clean data.
        sigma: float ``[B]`` noise levels, e.g. from :func:`sample_sigma_and_noise`.
        noise: ``[B, ...]`` standard normal n.
        sigma_data: σ_d of the "edm" weighting.
        weighting: one of :data:`WEIGHTINGS` (see :func:`loss_weights`).
        reduction: "mean" for a scalar, "none" for float32 ``[B]``.
        cond: extra keyword arguments for ``denoise_fn``.

    Returns:
        float32 scalar or ``[B]``.
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("reduction", reduction, REDUCTIONS)
    batch = diffusion.check_data("edm.loss", x0=x0, noise=noise)
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.shape != (batch,):
        raise ValueError(f"edm.loss: sigma must be [B] = ({batch},), got {sigma.shape}")
    x = x0 + _expand(sigma, x0).astype(x0.dtype) * noise.astype(x0.dtype)
    out = denoise_fn(x, sigma, **(cond or {}))
    if jnp.shape(out) != x0.shape:
        raise ValueError(f"edm.loss: denoise_fn must return {x0.shape}, got {jnp.shape(out)}")
    sq = jnp.square(out.astype(jnp.float32) - x0.astype(jnp.float32))
    per_example = jnp.mean(sq.reshape(batch, -1), axis=1) * loss_weights(
        sigma, weighting, sigma_data
    )
    return per_example if reduction == "none" else jnp.mean(per_example)


def loss_with_key(
    denoise_fn: DenoiseFn, key: jax.Array, x0: jax.Array, *, distribution: str = "lognormal", **kw
) -> jax.Array:
    """:func:`loss` with σ and n drawn from ``key`` (one key or ``[B]`` keys) by
    :func:`sample_sigma_and_noise`, which takes ``distribution``, ``p_mean``, ``p_std``,
    ``sigma_min`` and ``sigma_max``; other keyword arguments go to :func:`loss`."""
    dist = {k: kw.pop(k) for k in ("p_mean", "p_std", "sigma_min", "sigma_max") if k in kw}
    sigma, noise = sample_sigma_and_noise(key, x0, distribution=distribution, **dist)
    return loss(denoise_fn, x0, sigma, noise, **kw)


def _step(denoise_fn, x, xs_i, *, method, s_noise, last):
    """One step σ_i → σ_{i+1} of Algorithm 2: churn, Euler, and Heun's correction."""
    sigma, sigma_next, gamma = xs_i["sigma"], xs_i["sigma_next"], xs_i["gamma"]
    batch = x.shape[0]
    call = lambda y, s: denoise_fn(y, jnp.full((batch,), s, x.dtype))
    sigma_hat = sigma * (1 + gamma)
    if "key" in xs_i:  # x̂ = x + √(σ̂² - σ²) ε with √(σ̂² - σ²) = σ √(γ² + 2γ): exactly 0 at γ = 0
        if jnp.ndim(xs_i["key"]) == 1:  # one key per sample
            eps = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(xs_i["key"])
        else:
            eps = jax.random.normal(xs_i["key"], x.shape, x.dtype)
        x = x + (sigma * jnp.sqrt(gamma * (gamma + 2)) * s_noise) * eps
    d_hat = call(x, sigma_hat)
    if jnp.shape(d_hat) != x.shape:
        raise ValueError(f"edm.sample: denoise_fn must return {x.shape}, got {jnp.shape(d_hat)}")
    x_euler = d_hat + (sigma_next / sigma_hat) * (x - d_hat)  # x̂ + (σ' - σ̂)(x̂ - D)/σ̂; D at σ' = 0
    if method == "euler":
        return x_euler

    def heun():
        d = (x - d_hat) / sigma_hat
        d_next = (x_euler - call(x_euler, sigma_next)) / sigma_next
        return x + (sigma_next - sigma_hat) * (0.5 * (d + d_next))

    if not last:
        return heun()
    return jax.lax.cond(sigma_next > 0, heun, lambda: x_euler)


def sample(
    denoise_fn: DenoiseFn,
    x: jax.Array,
    sigmas: jax.Array,
    *,
    key: jax.Array | None = None,
    method: str = "heun",
    s_churn: float | jax.Array = 0.0,
    s_tmin: float | jax.Array = 0.0,
    s_tmax: float | jax.Array = math.inf,
    s_noise: float | jax.Array = 1.0,
    return_trajectory: bool = False,
):
    """Solves the probability-flow ODE (or Algorithm 2's SDE with churn) from σ_0 to σ_N.

    Step i: γ_i = min(S_churn/N, √2 - 1) if S_tmin ≤ σ_i ≤ S_tmax else 0; σ̂ = σ_i (1 + γ_i);
    x̂ = x_i + σ_i √(γ_i² + 2γ_i) S_noise ε; d = (x̂ - D(x̂; σ̂))/σ̂; x_{i+1} = x̂ + (σ_{i+1} - σ̂) d,
    and for "heun", unless σ_{i+1} = 0, the trapezoidal correction with d' at (x_{i+1}, σ_{i+1}).
    The first N - 1 steps run in one ``jax.lax.scan``; the last one follows it. The noise ε of
    step i is ``normal(split(key, N)[i], x.shape)`` (per-sample keys: ``split(key[b], N)[i]``).

    Args:
        denoise_fn: ``denoise_fn(x, sigma) -> [B, ...]``; called with sigma ``[B]`` in x's dtype.
        x: ``[B, ...]`` the start at σ_0, e.g. σ_0 · N(0, I); its dtype is the compute dtype
            (EDM samples in float64: pass float64 ``x`` under ``jax_enable_x64``).
        sigmas: ``[N + 1]`` decreasing levels (traced), only the last may be 0, e.g.
            :func:`sigma_steps` or :func:`ddpm_jax.ve.sigma_grid`.
        key: PRNG key (or ``[B]`` keys) for the churn noise; None for the deterministic sampler.
        method: "heun" (2N - 1 denoiser calls when σ_N = 0, else 2N) or "euler" (N calls).
        s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's S_churn, S_tmin, S_tmax, S_noise
            (traced); churn needs ``key``.
        return_trajectory: also return x at every σ_i, ``[N + 1, B, ...]``.

    Returns:
        ``[B, ...]`` samples at σ_N, or ``(samples, trajectory)``.
    """
    _check_choice("method", method, METHODS)
    batch = diffusion.check_data("edm.sample", x=x)
    sigmas = jnp.asarray(sigmas, x.dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"edm.sample: sigmas must be [N + 1] with N >= 1, got {sigmas.shape}")
    for name, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        if _concrete(value) and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"edm.sample: {name} must be a finite number >= 0, got {value!r}")
    no_churn = _concrete(s_churn) and s_churn == 0
    if key is None and not no_churn:
        raise ValueError("edm.sample: s_churn > 0 (or traced) draws noise; pass key=")
    n = sigmas.shape[0] - 1
    sig = sigmas[:-1]
    gamma = jnp.where(
        (sig >= s_tmin) & (sig <= s_tmax), jnp.minimum(s_churn / n, math.sqrt(2) - 1), 0.0
    ).astype(x.dtype)
    xs = {"sigma": sig, "sigma_next": sigmas[1:], "gamma": gamma}
    if not no_churn:
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        if key.ndim == 1:
            if key.shape[0] != batch:
                raise ValueError(f"edm.sample: {key.shape[0]} per-sample keys for B = {batch}")
            xs["key"] = jax.vmap(functools.partial(jax.random.split, num=n), out_axes=1)(key)
        else:
            xs["key"] = jax.random.split(key, n)
    run = functools.partial(_step, denoise_fn, method=method, s_noise=s_noise)

    def body(carry, xs_i):
        new = run(carry, xs_i, last=False)
        return new, new

    head = jax.tree.map(lambda a: a[:-1], xs)
    x_last, states = jax.lax.scan(body, x, head)
    out = run(x_last, jax.tree.map(lambda a: a[-1], xs), last=True)
    if not return_trajectory:
        return out
    return out, jnp.concatenate([x[None], states, out[None]])
