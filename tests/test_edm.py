"""EDM: the σ grid, preconditionings, loss and Algorithm 2 against closed forms and float64 NumPy.

With Gaussian data N(μ, s²) the ideal denoiser is D(x; σ) = μ + s²/(s² + σ²)(x - μ), and the
probability-flow ODE dx/dσ = (x - D)/σ keeps (x - μ)/√(s² + σ²) constant, so its endpoint is
exact: x(0) = μ + s (x(σ_0) - μ)/√(s² + σ_0²).
"""

import math

import _gaussians as g
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import edm, guidance, ve

jit_sample = jax.jit(edm.sample, static_argnums=0, static_argnames=("method", "return_trajectory"))
GAUSS_D = lambda x, sigma: g.gaussian_denoiser(jnp, x, sigma)
MIX_D = lambda x, sigma: g.mixture_denoiser(jnp, x, sigma)


def test_sigma_steps_is_eq5_ending_in_zero():
    got = np.asarray(edm.sigma_steps(18))
    i = np.arange(18)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    want = np.append((hi + i / 17 * (lo - hi)) ** 7, 0.0)
    assert got.shape == (19,) and got[-1] == 0 and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(edm.sigma_steps(1, 0.1, 5.0), [5.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(edm.sigma_steps(4, 1.0, 4.0, rho=1.0), [4, 3, 2, 1, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        edm.sigma_steps(0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm.sigma_steps(5, 2.0, 1.0)


def test_preconditionings_of_table_1():
    sigma = np.array([0.002, 0.1, 1.0, 80.0])
    sd = 0.5
    c = edm.precondition(jnp.asarray(sigma, jnp.float32), sd)
    np.testing.assert_allclose(c.c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)
    # With the EDM weighting, λ(σ) c_out(σ)² = 1: F's loss has unit weight at every σ.
    np.testing.assert_allclose(edm.loss_weights(jnp.asarray(sigma), "edm") * c.c_out**2, 1, 1e-5)
    c = edm.precondition(sigma, kind="ve")
    np.testing.assert_allclose(np.stack(c), [np.ones(4), sigma, np.ones(4), np.log(sigma / 2)],
                               rtol=1e-6)  # fmt: skip
    t = np.array([1e-5, 0.1, 0.5, 1.0])
    s_vp = np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))
    np.testing.assert_allclose(ve.vp_sigma(t), s_vp, rtol=1e-6)
    c = edm.precondition(jnp.asarray(s_vp, jnp.float32), kind="vp")
    np.testing.assert_allclose(c.c_noise, 999 * t, rtol=1e-4)
    np.testing.assert_allclose(c.c_out, -s_vp, rtol=1e-6)
    np.testing.assert_allclose(c.c_in, 1 / np.sqrt(s_vp**2 + 1), rtol=1e-6)
    u = ve.iddpm_sigmas()
    assert u.shape == (1000,) and np.all(np.diff(u) < 0)
    # EDM's iDDPM grid: σ_min = u_{M-1} ≈ 0.0064, and u_8 ≈ 80 (its sampler starts at j_0 = 8).
    assert abs(u[-1] - 0.0064) < 1e-4 and abs(u[8] - 80.2) < 0.1 and u[0] > 1e4
    j = np.array([0, 10, 500, 999])
    c = edm.precondition(jnp.asarray(u[j] * (1 + 1e-4), jnp.float32), kind="iddpm")
    np.testing.assert_array_equal(c.c_noise, 999 - j)
    with pytest.raises(ValueError, match="kind"):
        edm.precondition(1.0, kind="edm2")


def test_denoiser_applies_the_preconditioning():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    sigma = jnp.array([0.1, 1.0, 10.0])
    seen = {}

    def net_fn(x_in, c_noise, y):
        seen.update(x_in=x_in, c_noise=c_noise, y=y)
        return jnp.tanh(x_in) + y[:, None]

    for kind in edm.PRECONDITIONINGS:
        d = edm.denoiser(net_fn, sigma_data=0.7, kind=kind)(x, sigma, y=jnp.arange(3.0))
        c = edm.precondition(sigma, 0.7, kind=kind)
        f = np.tanh(c.c_in[:, None] * x) + np.arange(3.0)[:, None]
        np.testing.assert_allclose(d, c.c_skip[:, None] * x + c.c_out[:, None] * f, rtol=1e-6)
        np.testing.assert_allclose(seen["c_noise"], c.c_noise)
    d_scalar = edm.denoiser(lambda a, c: a)(x, 2.0)  # a scalar σ is broadcast to [B]
    assert d_scalar.shape == x.shape
    with pytest.raises(ValueError, match="sigma"):
        edm.denoiser(lambda a, c: a)(x, jnp.ones(2))


def test_sigma_distributions_and_per_example_keys():
    draw = jax.jit(edm.sample_sigma, static_argnums=1, static_argnames="distribution")
    key = jax.random.PRNGKey(1)
    log_s = np.log(np.asarray(draw(key, (20000,), p_mean=-1.2, p_std=1.2)))
    assert abs(log_s.mean() + 1.2) < 0.05 and abs(log_s.std() - 1.2) < 0.05
    s = np.asarray(draw(key, (20000,), distribution="ve"))
    u = np.log(s / 0.02) / np.log(100 / 0.02)  # uniform on [0, 1]
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    s = np.asarray(draw(key, (20000,), distribution="vp"))
    assert s.min() >= ve.vp_sigma(1e-5) * 0.999 and s.max() <= ve.vp_sigma(1.0) * 1.001
    x0 = jnp.ones((5, 3))
    keys = jax.random.split(jax.random.key(2), 5)
    sig, noise = edm.sample_sigma_and_noise(keys, x0)
    sig2, noise2 = edm.sample_sigma_and_noise(keys[2:4], x0[2:4])  # a row depends on its key alone
    np.testing.assert_array_equal(sig[2:4], sig2)
    np.testing.assert_array_equal(noise[2:4], noise2)
    sig1, noise1 = edm.sample_sigma_and_noise(jax.random.PRNGKey(3), x0)
    assert sig1.shape == (5,) and noise1.shape == (5, 3)


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_equals_float64_formula(self):
        x0 = jax.random.normal(jax.random.PRNGKey(4), (6, 4))
        noise = jax.random.normal(jax.random.PRNGKey(5), (6, 4))
        sigma = jnp.array([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
        weights = {"edm": lambda s: (s**2 + 0.25) / (0.5 * s) ** 2, "snr": lambda s: 1 / s**2,
                   "uniform": lambda s: 1.0 + 0 * s}  # fmt: skip
        for weighting, lam in weights.items():
            got = self.variant(
                lambda a, b, c, w=weighting: edm.loss(
                    GAUSS_D, a, c, b, weighting=w, reduction="none"
                )  # fmt: skip
            )(x0, noise, sigma)
            chex.assert_shape(got, (6,))
            chex.assert_type(got, jnp.float32)
            x64, n64, s64 = (np.asarray(a, np.float64) for a in (x0, noise, sigma))
            d = g.gaussian_denoiser(np, x64 + s64[:, None] * n64, s64)
            want = lam(s64) * ((d - x64) ** 2).mean(1)
            np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=weighting)

    def test_loss_with_key_expected_value_is_the_posterior_variance(self):
        # E||D* - x_0||² per dim = s²σ²/(s² + σ²) at fixed σ; λ_edm times it averaged over σ.
        x0 = jnp.asarray(g.MU + g.SD * np.asarray(jax.random.normal(jax.random.key(6), (4000, 4))))
        keys = jax.random.split(jax.random.key(7), 4000)
        got = jax.jit(lambda k: edm.loss_with_key(GAUSS_D, k, x0, reduction="none"))(keys)
        sigma, _ = edm.sample_sigma_and_noise(keys, x0)
        s64 = np.asarray(sigma, np.float64)[:, None]
        want = (s64**2 + 0.25) / (0.5 * s64) ** 2 * g.SD**2 * s64**2 / (g.SD**2 + s64**2)
        assert abs(float(got.mean()) / want.mean(1).mean() - 1) < 0.05
        low = jax.jit(lambda k: edm.loss_with_key(GAUSS_D, k, x0, p_mean=-3.0))(keys)
        assert float(low) != float(got.mean())  # p_mean reaches the σ draw


def _algorithm2_float64(denoise, x, sigmas, noises, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's Algorithm 2 (and its code's `edm_sampler`), line by line, in float64."""
    n = len(sigmas) - 1
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noises[i]
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < n - 1:
            d_prime = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def test_sample_equals_float64_transcription_of_algorithm_2():
    # S_tmin / S_tmax leave the first (σ = 80) and the last steps without churn (γ = 0).
    n, key, churn = 18, jax.random.PRNGKey(8), 30.0
    sigmas = edm.sigma_steps(n)
    x = sigmas[0] * jax.random.normal(jax.random.PRNGKey(9), (64, 2))
    opts = dict(s_churn=churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.007)
    got = jit_sample(MIX_D, x, sigmas, key=key, **opts)
    noises = [
        np.asarray(jax.random.normal(k, x.shape), np.float64) for k in jax.random.split(key, n)
    ]
    s64 = [float(s) for s in np.asarray(sigmas)]
    want = _algorithm2_float64(lambda a, s: g.mixture_denoiser(np, a, s),
                               np.asarray(x, np.float64), s64, noises, **opts)  # fmt: skip
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def _count_calls(denoise):
    calls = []

    def counted(x, sigma):
        jax.debug.callback(lambda s: calls.append(np.asarray(s)), sigma, ordered=True)
        return denoise(x, sigma)

    return counted, calls


@pytest.mark.parametrize("method,last_sigma,want", [("heun", 0.0, 9), ("heun", 0.01, 10),
                                                     ("euler", 0.0, 5)])  # fmt: skip
def test_denoiser_calls_per_sample(method, last_sigma, want):
    counted, calls = _count_calls(GAUSS_D)
    sigmas = jnp.array([10.0, 3.0, 1.0, 0.3, 0.1, last_sigma])  # N = 5 steps
    out = edm.sample(counted, jnp.ones((3, 4)), sigmas, method=method)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == want  # 2N - 1 for Heun ending at σ = 0, 2N otherwise, N for Euler
    assert all(c.shape == (3,) and np.all(c == c[0]) for c in calls)
    grid = [10.0, 3.0, 1.0, 0.3, 0.1, last_sigma]
    if method == "euler":  # D at σ_i for each step
        order = grid[:-1]
    else:  # D at σ_i and σ_{i+1} per step, at σ_{N-1} alone for the last step if σ_N = 0
        order = [s for i in range(4) for s in grid[i : i + 2]] + grid[4:5]
        order += [last_sigma] if last_sigma else []
    np.testing.assert_allclose([float(c[0]) for c in calls], order, rtol=1e-6)


def test_gaussian_endpoint_and_convergence_orders():
    x = jax.random.normal(jax.random.PRNGKey(10), (256, 4))
    orders = {}
    for method in ("heun", "euler"):
        errs = []
        for n in (8, 16, 32):
            sigmas = edm.sigma_steps(n)
            s0 = float(sigmas[0])
            out = jit_sample(GAUSS_D, s0 * x, sigmas, method=method)
            exact = g.MU + g.SD / np.sqrt(g.SD**2 + s0**2) * (s0 * np.asarray(x, np.float64) - g.MU)
            errs.append(np.abs(np.asarray(out, np.float64) - exact).max())
        orders[method] = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert errs[-1] < 0.4  # Euler at 32 steps
    # Heun is second order (error / 4 per doubling), Euler first order (/ 2).
    assert np.all(orders["heun"] > 1.8) and np.all(orders["heun"] < 2.6), orders
    assert np.all(orders["euler"] > 0.9) and np.all(orders["euler"] < 1.1), orders


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_gaussian_mixture_weights_and_means(churn):
    sigmas = edm.sigma_steps(32)
    x = sigmas[0] * jax.random.normal(jax.random.PRNGKey(11), (20000, 2))
    out = jit_sample(MIX_D, x, sigmas, key=jax.random.PRNGKey(12), s_churn=churn, s_tmin=0.05,
                     s_tmax=50.0)  # fmt: skip
    weights, means = g.assign(out)
    assert np.abs(weights - g.WEIGHTS).max() < 0.02, weights
    assert np.abs(means - g.MEANS).max() < 0.05, means


def test_no_recompilation_and_no_noise_at_zero_gamma():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, sigmas, key, churn, tmax):
        return edm.sample(GAUSS_D, x, sigmas, key=key, s_churn=churn, s_tmax=tmax)

    x = 80 * jax.random.normal(jax.random.PRNGKey(13), (8, 4))
    key = jax.random.PRNGKey(14)
    deterministic = jit_sample(GAUSS_D, x, edm.sigma_steps(6))
    # γ = 0 everywhere (S_tmax below every σ): exactly the deterministic sampler, no stray noise.
    np.testing.assert_array_equal(run(x, edm.sigma_steps(6), key, 10.0, 1e-4), deterministic)
    churned = run(x, edm.sigma_steps(6), key, 10.0, jnp.inf)
    other_grid = run(x, edm.sigma_steps(6, 0.01, 60.0), key, 0.0, jnp.inf)
    assert not np.allclose(churned, deterministic) and not np.allclose(other_grid, deterministic)


def test_per_sample_keys_and_trajectory():
    sigmas = edm.sigma_steps(6)
    x = sigmas[0] * jax.random.normal(jax.random.PRNGKey(15), (6, 2))
    keys = jax.random.split(jax.random.key(16), 6)
    out, traj = jit_sample(MIX_D, x, sigmas, key=keys, s_churn=20.0, return_trajectory=True)
    part = jit_sample(MIX_D, x[1:3], sigmas, key=keys[1:3], s_churn=20.0)
    np.testing.assert_allclose(out[1:3], part, rtol=1e-6, atol=1e-6)
    assert traj.shape == (7, 6, 2)
    np.testing.assert_array_equal(traj[0], x)
    np.testing.assert_array_equal(traj[-1], out)


def test_invalid_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="key"):
        edm.sample(GAUSS_D, x, edm.sigma_steps(3), s_churn=1.0)
    with pytest.raises(ValueError, match="method"):
        edm.sample(GAUSS_D, x, edm.sigma_steps(3), method="rk4")
    with pytest.raises(ValueError, match="sigmas"):
        edm.sample(GAUSS_D, x, jnp.ones((1,)))
    with pytest.raises(ValueError, match="s_noise"):
        edm.sample(GAUSS_D, x, edm.sigma_steps(3), s_noise=-1.0)
    with pytest.raises(ValueError, match="denoise_fn"):
        edm.sample(lambda a, s: a[:, :2], x, edm.sigma_steps(3))
    with pytest.raises(ValueError, match="sigma"):
        edm.loss(GAUSS_D, x, jnp.ones((3,)), x)


def test_classifier_free_guidance_wraps_a_denoiser():
    # A class-conditional Gaussian: component y's denoiser; guidance is affine in D.
    def denoise(x, sigma, y):
        mu = jnp.asarray(g.MEANS)[y]
        s2 = (sigma**2)[:, None]
        return mu + 0.25 / (0.25 + s2) * (x - mu)

    guided = guidance.classifier_free(denoise, 3.0, null_label=2)
    x = jax.random.normal(jax.random.PRNGKey(17), (4, 2))
    sigma, y = jnp.array([0.5, 1.0, 2.0, 4.0]), jnp.array([0, 1, 0, 1])
    want = 3.0 * denoise(x, sigma, y) - 2.0 * denoise(x, sigma, jnp.full((4,), 2))
    np.testing.assert_allclose(guided(x, sigma, y=y), want, rtol=1e-5, atol=1e-6)
    out = jit_sample(lambda a, s: guided(a, s, y=y), 80 * x, edm.sigma_steps(8))
    assert out.shape == (4, 2) and np.all(np.isfinite(out))
