"""Flow matching: interpolation, loss, diffusers' grid and the Euler / Heun samplers.

With Gaussian data N(μ, s²), x_t = (1 - t) x_0 + t ε ~ N((1 - t) μ, (1 - t)² s² + t²), and the
exact velocity's flow keeps (x_t - (1 - t) μ)/√((1 - t)² s² + t²) constant: from ε at t = 1 it
ends at x_0 = μ + s ε (the affine endpoint).
"""

import _gaussians as g
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import flow, guidance

jit_sample = jax.jit(flow.sample, static_argnums=0, static_argnames=("method", "return_trajectory"))
MIX_V = lambda x, t: g.mixture_velocity(jnp, x, t)


def gaussian_velocity(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 * g.SD**2 + t**2
    resid = x - (1 - t) * g.MU
    return t / var * resid - (g.MU + (1 - t) * g.SD**2 / var * resid)


def test_interpolate_and_time_shift():
    x0, noise = jnp.ones((3, 2)), jnp.full((3, 2), 3.0)
    np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.array([0.0, 0.25, 1.0])),
                               [[1, 1], [1.5, 1.5], [3, 3]])  # fmt: skip
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(flow.time_shift(t, 1.0), t)
    np.testing.assert_allclose(flow.time_shift(t, 3.0), 3 * t / (1 + 2 * t), rtol=1e-12)


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_equals_float64_formula(self):
        x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
        noise = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
        t = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
        got = self.variant(lambda a, b, c: flow.loss(gaussian_velocity, a, c, b, reduction="none"))(
            x0, noise, t
        )
        chex.assert_shape(got, (5,))
        chex.assert_type(got, jnp.float32)
        x64, n64, t64 = (np.asarray(a, np.float64) for a in (x0, noise, t))
        x_t = (1 - t64[:, None]) * x64 + t64[:, None] * n64
        v = np.asarray(gaussian_velocity(x_t, t64), np.float64)
        np.testing.assert_allclose(got, ((v - (n64 - x64)) ** 2).mean(1), rtol=1e-4, atol=1e-6)

    def test_time_distributions_and_per_example_keys(self):
        draw = jax.jit(flow.sample_t, static_argnums=1, static_argnames="distribution")
        key = jax.random.PRNGKey(2)
        u = np.asarray(draw(key, (20000,)))
        assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
        t = np.asarray(draw(key, (20000,), distribution="logit_normal", mean=0.5, std=0.8))
        logit = np.log(t / (1 - t))
        assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
        shifted = np.asarray(draw(key, (20000,), shift=3.0))
        np.testing.assert_allclose(shifted, 3 * u / (1 + 2 * u), rtol=1e-5)
        x0 = jnp.ones((4, 4))
        keys = jax.random.split(jax.random.key(3), 4)
        t, noise = flow.sample_t_and_noise(keys, x0)
        t2, noise2 = flow.sample_t_and_noise(keys[1:], x0[1:])
        np.testing.assert_array_equal(t[1:], t2)
        np.testing.assert_array_equal(noise[1:], noise2)
        loss = jax.jit(lambda k: flow.loss_with_key(gaussian_velocity, k, x0, shift=2.0))(keys)
        assert loss.shape == () and np.isfinite(loss)


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (10, 1.0), (28, 3.0), (50, 0.5)])
def test_timesteps_equal_diffusers_flow_match_euler(num_steps, shift):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    got = flow.timesteps(num_steps, shift)
    assert got.shape == (num_steps + 1,) and got[0] == 1.0 and got[-1] == 0.0
    np.testing.assert_allclose(got, sched.sigmas.numpy(), rtol=0, atol=1e-6)


def test_gaussian_endpoint_and_convergence_orders():
    eps = jax.random.normal(jax.random.PRNGKey(4), (256, 4))
    exact = g.MU + g.SD * np.asarray(eps, np.float64)
    orders = {}
    for method in ("heun", "euler"):
        errs = []
        for n in (8, 16, 32):
            out = jit_sample(gaussian_velocity, eps, jnp.linspace(1.0, 0.0, n + 1), method=method)
            errs.append(np.abs(np.asarray(out, np.float64) - exact).max())
        orders[method] = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert errs[-1] < (2e-3 if method == "heun" else 0.2), (method, errs)
    assert np.all(orders["heun"] > 1.8) and np.all(orders["heun"] < 2.6), orders
    assert np.all(orders["euler"] > 0.9) and np.all(orders["euler"] < 1.1), orders


@pytest.mark.parametrize("method,num_steps", [("heun", 32), ("euler", 100)])
def test_gaussian_mixture_weights_and_means(method, num_steps):
    eps = jax.random.normal(jax.random.PRNGKey(5), (20000, 2))
    out = jit_sample(MIX_V, eps, flow.timesteps(num_steps), method=method)
    weights, means = g.assign(out)
    assert np.abs(weights - g.WEIGHTS).max() < 0.02, weights
    assert np.abs(means - g.MEANS).max() < 0.05, means


@pytest.mark.parametrize("method,want", [("euler", 4), ("heun", 8)])
def test_velocity_calls_and_trajectory(method, want):
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda s: calls.append(np.asarray(s)), t, ordered=True)
        return gaussian_velocity(x, t)

    ts = jnp.array([1.0, 0.6, 0.3, 0.1, 0.0])
    out, traj = flow.sample(counted, jnp.ones((3, 4)), ts, method=method, return_trajectory=True)
    jax.block_until_ready(out)
    jax.effects_barrier()
    grid = [1.0, 0.6, 0.3, 0.1, 0.0]
    order = grid[:-1] if method == "euler" else [s for i in range(4) for s in grid[i : i + 2]]
    np.testing.assert_allclose([float(c[0]) for c in calls], order, rtol=1e-6)
    assert len(calls) == want and all(c.shape == (3,) for c in calls)
    assert traj.shape == (5, 3, 4)
    np.testing.assert_array_equal(traj[-1], out)


def test_no_recompilation_for_new_grids():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, ts):
        return flow.sample(gaussian_velocity, x, ts, method="heun")

    x = jnp.ones((2, 4))
    a, b = run(x, flow.timesteps(6)), run(x, flow.timesteps(6, 3.0))
    assert not np.allclose(a, b)


def test_classifier_free_guidance_wraps_a_velocity():
    def velocity(x, t, y):  # flow of a point mass at y: v = (x - y) / t for x_t = (1 - t) y + t ε
        return (x - y[:, None]) / t[:, None]

    guided = guidance.classifier_free(velocity, 2.0, null_label=0.0)
    x, t, y = jnp.ones((3, 2)), jnp.array([0.2, 0.5, 1.0]), jnp.array([1.0, -1.0, 3.0])
    want = 2 * velocity(x, t, y) - velocity(x, t, jnp.zeros(3))
    np.testing.assert_allclose(guided(x, t, y=y), want, rtol=1e-6)


def test_invalid_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="method"):
        flow.sample(gaussian_velocity, x, flow.timesteps(3), method="rk4")
    with pytest.raises(ValueError, match="timesteps"):
        flow.sample(gaussian_velocity, x, jnp.ones((1,)))
    with pytest.raises(ValueError, match="velocity_fn"):
        flow.sample(lambda a, t: a[:, :2], x, flow.timesteps(3))
    with pytest.raises(ValueError, match="distribution"):
        flow.sample_t(jax.random.PRNGKey(0), (3,), distribution="beta")
    with pytest.raises(ValueError, match="shift"):
        flow.timesteps(3, 0.0)
    with pytest.raises(ValueError, match="t must"):
        flow.loss(gaussian_velocity, x, jnp.ones((3,)), x)
