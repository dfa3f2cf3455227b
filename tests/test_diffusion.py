import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, schedules

SCHED = schedules.linear(100, 1e-3, 0.05)
BETAS64 = np.linspace(1e-3, 0.05, 100)  # float64 copy of SCHED for the references
AB64 = np.cumprod(1 - BETAS64)
AB64_PREV = np.append(1.0, AB64[:-1])


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


# ------------------------------------------- closed forms, with and without jit (chex.variants)


def _column(values, t, ndim):
    """float64 ``values[t]`` shaped [B, 1, ..., 1] to broadcast against rank-``ndim`` data."""
    return np.asarray(values)[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


class ClosedFormsTest(chex.TestCase):
    """Each function against its formula evaluated in float64 NumPy, eager and under jax.jit."""

    T = jnp.array([0, 1, 37, 99], jnp.int32)

    def _arrays(self, count, seed=0):
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((4, 3, 2)) for _ in range(count)]

    @chex.variants(with_jit=True, without_jit=True)
    def test_q_sample_is_eq_4(self):
        x0, eps = self._arrays(2)
        got = self.variant(diffusion.q_sample)(SCHED, jnp.float32(x0), self.T, jnp.float32(eps))
        chex.assert_shape(got, x0.shape)
        chex.assert_type(got, jnp.float32)
        ab = _column(AB64, self.T, 3)
        np.testing.assert_allclose(got, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_posterior_is_eq_7(self):
        x0, xt = self._arrays(2, seed=1)
        mean, var, log_var = self.variant(diffusion.q_posterior_mean_variance)(
            SCHED, jnp.float32(x0), jnp.float32(xt), self.T
        )
        chex.assert_shape(mean, x0.shape)
        chex.assert_shape([var, log_var], (4, 1, 1))
        b, ab, ab_prev = (_column(v, self.T, 3) for v in (BETAS64, AB64, AB64_PREV))
        want_mean = (
            b * np.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * np.sqrt(1 - b) / (1 - ab) * xt
        )
        want_var = b * (1 - ab_prev) / (1 - ab)
        np.testing.assert_allclose(mean, want_mean, atol=2e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-12)
        # The clipped log-variance takes β̃_1 at t = 0 (where β̃_0 = 0).
        var1 = BETAS64[1] * (1 - AB64[0]) / (1 - AB64[1])
        want_log = np.log(np.where(np.asarray(self.T)[:, None, None] == 0, var1, want_var))
        np.testing.assert_allclose(log_var, want_log, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_parametrization_conversions_are_their_formulas(self):
        a, b = self._arrays(2, seed=2)  # independent inputs: the formulas, not only round trips
        ab = _column(AB64, self.T, 3)
        sa, so = np.sqrt(ab), np.sqrt(1 - ab)
        cases = {
            diffusion.predict_x0_from_eps: (a - so * b) / sa,  # (x_t, eps)
            diffusion.predict_eps_from_x0: (a - sa * b) / so,  # (x_t, x0)
            diffusion.predict_v: sa * b - so * a,  # (x0, eps)
            diffusion.predict_x0_from_v: sa * a - so * b,  # (x_t, v)
            diffusion.predict_eps_from_v: so * a + sa * b,  # (x_t, v)
        }
        for fn, want in cases.items():
            got = self.variant(fn)(SCHED, jnp.float32(a), self.T, jnp.float32(b))
            chex.assert_shape(got, a.shape)
            chex.assert_type(got, jnp.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)

    @chex.variants(with_jit=True, without_jit=True)
    def test_p_mean_variance_fixed_large_is_beta(self):
        out, xt = self._arrays(2, seed=3)
        fn = self.variant(diffusion.p_mean_variance, static_argnames=("prediction", "variance"))
        got = fn(SCHED, jnp.float32(out), jnp.float32(xt), self.T, variance="fixed_large")
        # β_t, with β̃_1 at t = 0 (Ho et al.'s code); the mean is Eq. 11 for ε-prediction.
        var1 = BETAS64[1] * (1 - AB64[0]) / (1 - AB64[1])
        b = _column(BETAS64, self.T, 3)
        np.testing.assert_allclose(
            got.variance, np.where(np.asarray(self.T)[:, None, None] == 0, var1, b), rtol=1e-5
        )
        ab = _column(AB64, self.T, 3)
        eq11 = (xt - b / np.sqrt(1 - ab) * out) / np.sqrt(1 - b)
        np.testing.assert_allclose(got.mean, eq11, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- argument checks


def test_wrong_timesteps_name_the_shape_received_and_expected():
    x0 = jnp.zeros((8, 4))
    with pytest.raises(
        ValueError, match=r"q_sample: t must be int32 \[B\] = \(8,\), got float32 \(8, 1\)"
    ):
        diffusion.q_sample(SCHED, x0, jnp.zeros((8, 1)), x0)
    with pytest.raises(ValueError, match=r"t must be int32 \[B\] = \(8,\), got int32 \(7,\)"):
        diffusion.q_sample(SCHED, x0, jnp.zeros((7,), jnp.int32), x0)
    with pytest.raises(ValueError, match=r"t must be int32 \[B\] = \(8,\), got int32 \(\)"):
        diffusion.p_mean_variance(SCHED, x0, x0, jnp.int32(3))
    with pytest.raises(ValueError, match=r"predict_x0_from_eps: t must be int32 .* got float32"):
        diffusion.predict_x0_from_eps(SCHED, x0, jnp.zeros((8,)), x0)
    # Static checks: the same message under jit (raised while tracing).
    with pytest.raises(ValueError, match=r"q_sample: t must be int32 \[B\] = \(8,\)"):
        jax.jit(diffusion.q_sample)(SCHED, x0, jnp.zeros((8, 1), jnp.int32), x0)


def test_mismatched_data_names_the_argument_and_both_shapes():
    x0, t = jnp.zeros((8, 4)), jnp.zeros((8,), jnp.int32)
    with pytest.raises(
        ValueError, match=r"q_sample: noise must have the shape of x0 \(8, 4\), got \(8, 3\)"
    ):
        diffusion.q_sample(SCHED, x0, t, jnp.zeros((8, 3)))
    with pytest.raises(
        ValueError, match=r"q_posterior_mean_variance: x0 must have the shape of x_t"
    ):
        diffusion.q_posterior_mean_variance(SCHED, x0[:, :2], x0, t)
    with pytest.raises(
        ValueError,
        match=r"p_mean_variance: model_output must have the shape of x_t \(8, 4\), got \(8, 4, 1\)",
    ):
        diffusion.p_mean_variance(SCHED, x0[..., None], x0, t)
    with pytest.raises(
        ValueError,
        match=r"x0 must be \[B, \.\.\.\] with at least one axis after the batch axis.*\(8,\)",
    ):
        diffusion.q_sample_with_key(SCHED, jax.random.PRNGKey(0), jnp.zeros((8,)), t)
    with pytest.raises(ValueError, match=r"predict_v: x0 must be a float array, got uint8"):
        diffusion.predict_v(SCHED, jnp.zeros((8, 4), jnp.uint8), t, x0)
    with pytest.raises(ValueError, match=r"snr: t must be int32 \[B\], got int32 \(8, 1\)"):
        diffusion.snr(SCHED, t[:, None])
