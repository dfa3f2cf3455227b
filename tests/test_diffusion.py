import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, schedules

SCHED = schedules.linear(100, 1e-3, 0.05)


def test_q_sample_matches_running_the_one_step_chain():
    """The closed form q(x_t|x_0) equals t+1 applications of q(x_s|x_{s-1}) in distribution."""
    n = 20000
    x0_values = jnp.array([-1.0, 0.3, 0.9])
    x0 = jnp.broadcast_to(x0_values, (n, 3))
    ts = [0, 5, 40, 99]
    key = jax.random.PRNGKey(0)

    def chain(x, inputs):
        beta, k = inputs
        x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(k, x.shape)
        return x, x

    keys = jax.random.split(key, SCHED.num_timesteps)
    _, traj = jax.lax.scan(chain, x0, (SCHED.betas, keys))  # traj[s] = x after step s
    for t in ts:
        tt = jnp.full((n,), t, jnp.int32)
        closed, _ = diffusion.q_sample_with_key(SCHED, jax.random.PRNGKey(t + 1), x0, tt)
        ab = float(SCHED.alpha_bars[t])
        exp_mean, exp_var = np.sqrt(ab) * np.asarray(x0_values), 1 - ab
        for samples in (np.asarray(traj[t], np.float64), np.asarray(closed, np.float64)):
            # Standard errors: sqrt(var/n) for the mean, var*sqrt(2/n) for the variance; 5 sigma.
            np.testing.assert_allclose(
                samples.mean(0), exp_mean, atol=5 * np.sqrt(exp_var / n) + 1e-6
            )
            np.testing.assert_allclose(
                samples.var(0), exp_var, atol=5 * exp_var * np.sqrt(2 / n) + 1e-6
            )


@pytest.mark.parametrize("t", [1, 10, 50, 99])
def test_posterior_matches_bayes_rule_numerically(t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated on a float64 grid."""
    x0, xt = 0.7, -0.4
    b = np.asarray(SCHED.betas, np.float64)
    ab = np.cumprod(1 - b)
    ab_prev = ab[t - 1]
    grid = np.linspace(-8, 8, 400001)
    log_prior = -((grid - np.sqrt(ab_prev) * x0) ** 2) / (2 * (1 - ab_prev))
    log_lik = -((xt - np.sqrt(1 - b[t]) * grid) ** 2) / (2 * b[t])
    w = np.exp(log_prior + log_lik - (log_prior + log_lik).max())
    w /= w.sum()
    num_mean = (w * grid).sum()
    num_var = (w * (grid - num_mean) ** 2).sum()

    tt = jnp.array([t], jnp.int32)
    mean, var, log_var = diffusion.q_posterior_mean_variance(
        SCHED, jnp.array([[x0]]), jnp.array([[xt]]), tt
    )
    assert float(mean[0, 0]) == pytest.approx(num_mean, abs=1e-5)
    assert float(var[0, 0]) == pytest.approx(num_var, rel=1e-4)
    assert float(log_var[0, 0]) == pytest.approx(np.log(num_var), abs=1e-4)


def test_posterior_at_t0_is_the_data():
    x0, xt = jnp.array([[0.5, -0.2]]), jnp.array([[0.1, 0.3]])
    mean, var, _ = diffusion.q_posterior_mean_variance(SCHED, x0, xt, jnp.array([0]))
    np.testing.assert_allclose(mean, x0, atol=1e-6)
    assert float(var[0, 0]) == 0.0


def _random_xt(key, shape, t):
    k1, k2 = jax.random.split(key)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    eps = jax.random.normal(k2, shape)
    return x0, eps, diffusion.q_sample(SCHED, x0, t, eps)


def test_parametrization_round_trips():
    t = jnp.array([0, 3, 50, 99], jnp.int32)
    x0, eps, xt = _random_xt(jax.random.PRNGKey(1), (4, 5, 5, 3), t)
    x0_hat = diffusion.predict_x0_from_eps(SCHED, xt, t, eps)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    eps_back = diffusion.predict_eps_from_x0(SCHED, xt, t, x0_hat)
    np.testing.assert_allclose(eps_back, eps, atol=2e-4, rtol=1e-3)
    v = diffusion.predict_v(SCHED, x0, t, eps)
    np.testing.assert_allclose(diffusion.predict_eps_from_v(SCHED, xt, t, v), eps, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_x0_from_v(SCHED, xt, t, v), x0, atol=1e-5)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        x0_p, eps_p = diffusion.predict_x0_and_eps(SCHED, out, xt, t, pred)
        np.testing.assert_allclose(x0_p, x0, atol=2e-4)
        np.testing.assert_allclose(eps_p, eps, atol=2e-3, rtol=1e-3)


def test_p_mean_variance_with_true_prediction_is_the_posterior():
    t = jnp.array([1, 20, 99], jnp.int32)
    x0, eps, xt = _random_xt(jax.random.PRNGKey(2), (3, 7), t)
    post_mean, post_var, _ = diffusion.q_posterior_mean_variance(SCHED, x0, xt, t)
    v = diffusion.predict_v(SCHED, x0, t, eps)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        out_ = diffusion.p_mean_variance(SCHED, out, xt, t, prediction=pred)
        np.testing.assert_allclose(out_.mean, post_mean, atol=1e-4)
        np.testing.assert_allclose(out_.variance, post_var, rtol=1e-6)
    # Ho et al.'s eq. 11: mu = 1/sqrt(alpha) (x_t - beta/sqrt(1-abar) eps).
    a, b = SCHED.alphas[t][:, None], SCHED.betas[t][:, None]
    eq11 = (xt - b / SCHED.sqrt_one_minus_alpha_bars[t][:, None] * eps) / jnp.sqrt(a)
    np.testing.assert_allclose(diffusion.p_mean_variance(SCHED, eps, xt, t).mean, eq11, atol=1e-4)
    large = diffusion.p_mean_variance(SCHED, eps, xt, t, variance="fixed_large")
    np.testing.assert_allclose(
        large.variance[:, 0], [SCHED.betas[1], SCHED.betas[20], SCHED.betas[99]]
    )
    large0 = diffusion.p_mean_variance(
        SCHED, eps[:1], xt[:1], jnp.array([0]), variance="fixed_large"
    )
    assert float(large0.variance[0, 0]) == pytest.approx(float(SCHED.posterior_variance[1]))


def test_clip_x0():
    t = jnp.array([99], jnp.int32)
    xt = jnp.full((1, 4), 3.0)
    out = diffusion.p_mean_variance(SCHED, jnp.zeros((1, 4)), xt, t, clip_x0=1.0)
    assert float(jnp.abs(out.pred_x0).max()) <= 1.0
    x0, eps = diffusion.predict_x0_and_eps(SCHED, jnp.zeros((1, 4)), xt, t, clip_x0=1.0)
    np.testing.assert_allclose(diffusion.q_sample(SCHED, x0, t, eps), xt, atol=1e-4)


def test_jit_vmap_and_float32():
    t = jnp.array([0, 7, 99], jnp.int32)
    x0, eps, xt = _random_xt(jax.random.PRNGKey(3), (3, 4, 4, 2), t)
    fns = {
        "q_sample": lambda s, a, b, c: diffusion.q_sample(s, a, b, c),
        "x0_from_eps": lambda s, a, b, c: diffusion.predict_x0_from_eps(s, c, b, a),
        "eps_from_x0": lambda s, a, b, c: diffusion.predict_eps_from_x0(s, c, b, a),
        "v": lambda s, a, b, c: diffusion.predict_v(s, a, b, c),
        "x0_from_v": lambda s, a, b, c: diffusion.predict_x0_from_v(s, c, b, a),
        "eps_from_v": lambda s, a, b, c: diffusion.predict_eps_from_v(s, c, b, a),
        "posterior": lambda s, a, b, c: diffusion.q_posterior_mean_variance(s, a, c, b)[0],
        "p_mean": lambda s, a, b, c: diffusion.p_mean_variance(s, a, c, b).mean,
    }
    for name, fn in fns.items():
        eager = fn(SCHED, x0, t, eps)
        jitted = jax.jit(fn)(SCHED, x0, t, eps)
        # vmap over examples: each call sees a batch of one.
        vmapped = jax.vmap(lambda a, b, c, f=fn: f(SCHED, a[None], b[None], c[None])[0])(x0, t, eps)
        assert eager.dtype == jnp.float32 and jitted.dtype == jnp.float32, name
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(vmapped, eager, rtol=1e-5, atol=1e-5, err_msg=name)


def test_any_rank():
    t = jnp.array([3, 9], jnp.int32)
    for shape in [(2, 6), (2, 6, 3), (2, 4, 4, 2, 2)]:
        x = jnp.ones(shape)
        out = diffusion.q_sample(SCHED, x, t, jnp.zeros(shape))
        np.testing.assert_allclose(out[1], np.full(shape[1:], float(SCHED.sqrt_alpha_bars[9])))


def test_bad_prediction_and_variance():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="prediction"):
        diffusion.p_mean_variance(SCHED, x, x, jnp.array([1]), prediction="score")
    with pytest.raises(ValueError, match="variance"):
        diffusion.p_mean_variance(SCHED, x, x, jnp.array([1]), variance="learned")
