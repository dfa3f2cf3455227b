"""The VE view of schedules: the geometric VE schedule, σ grids, and the ε / x_0 / v adapter.

The adapter's known identity: deterministic DDIM on a VP model equals Euler on the probability-flow
ODE dx/dσ = (x - D)/σ in x = x_t/√ᾱ over the σ of the same timesteps (Song et al. 2021, Sec. 4.3;
Karras et al. 2022, App. C.3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import edm, guidance, samplers, schedules, ve

SCHED = schedules.linear(1000)
AB = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.5, 1.0, 0.2, 1.5])


def _alpha_bar(schedule, t):
    """ᾱ_t, linearly interpolated at a fractional t."""
    if jnp.issubdtype(t.dtype, jnp.integer):
        return schedule.alpha_bars[t][:, None]
    return jnp.interp(t, jnp.arange(schedule.num_timesteps), schedule.alpha_bars)[:, None]


def _x0_hat(schedule, x, t):
    ab = _alpha_bar(schedule, t)
    return MU + jnp.sqrt(ab) * SD**2 * (x - jnp.sqrt(ab) * MU) / (ab * SD**2 + 1 - ab)


def model(schedule, prediction):
    """The exact predictor of N(MU, diag(SD²)) data in the parametrization ``prediction``."""

    def model_fn(x, t):
        ab = _alpha_bar(schedule, t)
        x0 = _x0_hat(schedule, x, t)
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[prediction]

    return model_fn


def test_geometric_schedule_has_geometric_sigmas_and_valid_vp_tables():
    sched = ve.geometric(1000, 0.01, 50.0)
    want = 0.01 * (5000.0 ** (np.arange(1000) / 999))
    np.testing.assert_allclose(ve.sigmas(sched), want, rtol=2e-6)
    np.testing.assert_allclose(sched.alpha_bars, 1 / (1 + want**2), rtol=2e-6)
    assert np.all(np.asarray(sched.betas) > 0) and np.all(np.asarray(sched.betas) < 1)
    with pytest.raises(ValueError, match="sigma_min"):
        ve.geometric(10, 1.0, 0.5)


def test_sigma_grid_and_timestep_of_sigma():
    grid = samplers.timesteps(SCHED, 10, "uniform")
    sig = ve.sigma_grid(SCHED, grid)
    np.testing.assert_allclose(sig[:-1], np.sqrt((1 - AB) / AB)[np.asarray(grid)], rtol=1e-5)
    assert sig.shape == (11,) and sig[-1] == 0
    table = ve.sigmas(SCHED)
    t = jnp.array([0, 5, 500, 999])
    np.testing.assert_array_equal(ve.timestep_of_sigma(SCHED, table[t]), t)
    np.testing.assert_allclose(ve.timestep_of_sigma(SCHED, table[t], "fractional"), t, atol=1e-3)
    mid = jnp.sqrt(table[t[1:3]] * table[t[1:3] + 1])  # halfway in log σ
    np.testing.assert_allclose(ve.timestep_of_sigma(SCHED, mid, "fractional"), t[1:3] + 0.5, 1e-3)
    np.testing.assert_array_equal(ve.timestep_of_sigma(SCHED, jnp.array([1e-9, 1e9])), [0, 999])


def test_ddim_eta0_equals_euler_through_the_adapter():
    n = 10
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    grid = samplers.timesteps(SCHED, n, "uniform")
    ddim = samplers.sample(model(SCHED, "eps"), SCHED, jax.random.PRNGKey(1), (6, 4),
                           method="ddim", num_steps=n, x_T=x_T)  # fmt: skip
    sigmas = ve.sigma_grid(SCHED, grid)
    x = x_T * jnp.sqrt(1 + sigmas[0] ** 2)  # the VE state x_T / √ᾱ
    for prediction in ("eps", "x0", "v"):
        denoise = ve.denoiser(model(SCHED, prediction), SCHED, prediction=prediction)
        euler = edm.sample(denoise, x, sigmas, method="euler")
        np.testing.assert_allclose(euler, ddim, rtol=1e-5, atol=1e-5, err_msg=prediction)


def test_adapter_is_the_exact_denoiser_on_the_grid_and_composes_with_guidance():
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 4)) * 3
    t = jnp.array([0, 100, 400, 900])
    sigma = ve.sigmas(SCHED)[t]
    want = _x0_hat(SCHED, x / jnp.sqrt(1 + sigma[:, None] ** 2), t)
    for mapping in ve.TIMESTEP_MAPPINGS:
        d = ve.denoiser(model(SCHED, "eps"), SCHED, timestep_mapping=mapping)(x, sigma)
        np.testing.assert_allclose(d, want, rtol=2e-5, atol=2e-5, err_msg=mapping)

    def cond_eps(x_t, t, y):  # class y shifts the data mean by y
        return model(SCHED, "eps")(x_t - jnp.sqrt(SCHED.alpha_bars[t])[:, None] * y[:, None], t)

    y = jnp.array([1.0, -1.0, 2.0, 0.0])
    cfg = lambda f: guidance.classifier_free(f, 2.5, null_label=0.0)
    guided_then_adapted = ve.denoiser(cfg(cond_eps), SCHED)(x, sigma, y=y)
    adapted_then_guided = cfg(ve.denoiser(cond_eps, SCHED))(x, sigma, y=y)
    np.testing.assert_allclose(guided_then_adapted, adapted_then_guided, rtol=1e-5, atol=1e-5)


def test_ve_schedule_with_the_samplers_and_edm_sample():
    sched = ve.geometric(1000, 0.01, 50.0)
    z = jax.random.normal(jax.random.PRNGKey(3), (20000, 4))
    s_max = float(ve.sigmas(sched)[-1])
    x_ve = MU + np.sqrt(SD**2 + s_max**2) * z  # the exact marginal at σ_max (x_0 + σ n)
    want_mean, want_std = MU + SD * np.mean(z, 0), SD * np.std(z, 0)  # the exact flow's endpoint
    x = samplers.sample(model(sched, "eps"), sched, jax.random.PRNGKey(4), z.shape, method="ddim",
                        num_steps=200, timestep_spacing="logsnr",
                        x_T=x_ve / np.sqrt(1 + s_max**2))  # fmt: skip
    np.testing.assert_allclose(np.mean(np.asarray(x), 0), want_mean, atol=0.01)
    np.testing.assert_allclose(np.std(np.asarray(x), 0), want_std, rtol=0.02)
    sigmas = ve.sigma_grid(sched, samplers.timesteps(sched, 50, "karras"))
    assert sigmas[0] == s_max
    x = edm.sample(ve.denoiser(model(sched, "eps"), sched), x_ve, sigmas)
    np.testing.assert_allclose(np.mean(np.asarray(x), 0), want_mean, atol=0.01)
    np.testing.assert_allclose(np.std(np.asarray(x), 0), want_std, rtol=0.02)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="timestep_mapping"):
        ve.denoiser(model(SCHED, "eps"), SCHED, timestep_mapping="linear")
    with pytest.raises(ValueError, match="prediction"):
        ve.denoiser(model(SCHED, "eps"), SCHED, prediction="score")
    with pytest.raises(ValueError, match="timesteps"):
        ve.sigma_grid(SCHED, jnp.ones(3))
