import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, losses, schedules

SCHED = schedules.cosine(50)


def _data(key, b=16):
    return jax.random.uniform(key, (b, 4, 4, 3), minval=-1, maxval=1)


def _oracle(x0, prediction):
    """A model_fn that knows x0, so it can output the exact target for any x_t."""

    def model_fn(x_t, t):
        eps = diffusion.predict_eps_from_x0(SCHED, x_t, t, x0)
        return {"eps": eps, "x0": x0, "v": diffusion.predict_v(SCHED, x0, t, eps)}[prediction]

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_exact_model_has_zero_loss(prediction, weighting):
    x0 = _data(jax.random.PRNGKey(0))
    t, noise = losses.sample_timesteps_and_noise(jax.random.PRNGKey(1), x0, 50)
    t = jnp.maximum(t, 1)  # at t = 0 eps is ill-conditioned in float32 (sqrt(1-abar) ~ 1e-2)
    loss = losses.diffusion_loss(
        _oracle(x0, prediction), SCHED, x0, t, noise, prediction=prediction, weighting=weighting
    )
    assert float(loss) < 1e-5


def test_zero_model_loss_equals_target_energy():
    x0 = _data(jax.random.PRNGKey(2), b=64)
    t, noise = losses.sample_timesteps_and_noise(jax.random.PRNGKey(3), x0, 50)
    zero = lambda x_t, t: jnp.zeros_like(x_t)
    per = losses.diffusion_loss(zero, SCHED, x0, t, noise, reduction="none")
    np.testing.assert_allclose(per, jnp.mean(noise**2, axis=(1, 2, 3)), rtol=1e-6)
    per_x0 = losses.diffusion_loss(zero, SCHED, x0, t, noise, prediction="x0", reduction="none")
    np.testing.assert_allclose(per_x0, jnp.mean(x0**2, axis=(1, 2, 3)), rtol=1e-6)
    v = diffusion.predict_v(SCHED, x0, t, noise)
    per_v = losses.diffusion_loss(zero, SCHED, x0, t, noise, prediction="v", reduction="none")
    np.testing.assert_allclose(per_v, jnp.mean(v**2, axis=(1, 2, 3)), rtol=1e-5)
    mean = losses.diffusion_loss(zero, SCHED, x0, t, noise)
    assert float(mean) == pytest.approx(float(per.mean()), rel=1e-6)


def test_min_snr_weights_make_every_target_the_same_x0_loss():
    """Hang et al.: with min-SNR weights, eps, x0 and v losses all equal min(SNR,γ)·||x0 - x̂0||²."""
    x0 = _data(jax.random.PRNGKey(4))
    t, noise = losses.sample_timesteps_and_noise(jax.random.PRNGKey(5), x0, 50)
    err = 0.1 * jax.random.normal(jax.random.PRNGKey(6), x0.shape)
    x0_hat = x0 + err
    snr = np.exp(np.asarray(SCHED.log_snr, np.float64))[np.asarray(t)]
    expected = np.minimum(snr, 5.0) * np.mean(np.asarray(err, np.float64) ** 2, axis=(1, 2, 3))
    for prediction in ("eps", "x0", "v"):

        def model_fn(x_t, tt, p=prediction):
            eps_hat = diffusion.predict_eps_from_x0(SCHED, x_t, tt, x0_hat)
            return {
                "eps": eps_hat,
                "x0": x0_hat,
                "v": diffusion.predict_v(SCHED, x0_hat, tt, eps_hat),
            }[p]

        per = losses.diffusion_loss(
            model_fn, SCHED, x0, t, noise, prediction=prediction, weighting="min_snr",
            reduction="none",
        )  # fmt: skip
        np.testing.assert_allclose(per, expected, rtol=2e-3, atol=1e-6, err_msg=prediction)


def test_cond_is_passed_and_gradients_flow():
    x0 = _data(jax.random.PRNGKey(7))
    w0 = jnp.float32(0.5)

    def loss(w, key):
        def model_fn(x_t, t, y):
            return w * x_t + 0.01 * y[:, None, None, None]

        return losses.diffusion_loss_with_key(
            model_fn, SCHED, key, x0, cond={"y": jnp.arange(16.0)}
        )

    val, grad = jax.jit(jax.value_and_grad(loss))(w0, jax.random.PRNGKey(8))
    assert np.isfinite(float(val)) and np.isfinite(float(grad)) and float(grad) != 0.0
    assert val.dtype == jnp.float32


def test_timesteps_cover_the_range_uniformly():
    x0 = jnp.zeros((20000, 1))
    t, _ = losses.sample_timesteps_and_noise(jax.random.PRNGKey(9), x0, 50)
    counts = np.bincount(np.asarray(t), minlength=50)
    assert t.dtype == jnp.int32 and counts.min() > 300 and counts.max() < 500


def test_bad_arguments():
    x0 = jnp.zeros((2, 3))
    t = jnp.zeros((2,), jnp.int32)
    fn = lambda x, t: x
    with pytest.raises(ValueError, match="prediction"):
        losses.diffusion_loss(fn, SCHED, x0, t, x0, prediction="score")
    with pytest.raises(ValueError, match="weighting"):
        losses.diffusion_loss(fn, SCHED, x0, t, x0, weighting="p2")
    with pytest.raises(ValueError, match="reduction"):
        losses.diffusion_loss(fn, SCHED, x0, t, x0, reduction="sum")


class LossClosedFormTest(chex.TestCase):
    """diffusion_loss of a linear model against float64 NumPy, eager and under jax.jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_model_loss_equals_float64_reference(self):
        rng = np.random.default_rng(0)
        x0, noise = rng.uniform(-1, 1, (6, 2, 3)), rng.standard_normal((6, 2, 3))
        t = np.array([0, 3, 10, 25, 40, 49])
        # ᾱ of SCHED = cosine(50) in float64 (Nichol & Dhariwal Eq. 17, β clipped at 0.999).
        f = np.cos((np.arange(51) / 50 + 0.008) / 1.008 * np.pi / 2) ** 2
        ab = np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))[t][:, None, None]
        x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
        snr = (ab / (1 - ab))[:, 0, 0]
        clipped = np.minimum(snr, 5.0)  # Min-SNR-γ, γ = 5
        targets = {"eps": noise, "x0": x0, "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}
        weights = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
        for prediction in ("eps", "x0", "v"):
            sq = (0.5 * x_t - targets[prediction]) ** 2
            want = weights[prediction] * np.mean(sq, axis=(1, 2))

            def loss(x0, t, noise, p=prediction):
                return losses.diffusion_loss(
                    lambda x_t, t: 0.5 * x_t, SCHED, x0, t, noise, prediction=p,
                    weighting="min_snr", reduction="none",
                )  # fmt: skip

            got = self.variant(loss)(jnp.float32(x0), jnp.int32(t), jnp.float32(noise))
            chex.assert_shape(got, (6,))
            chex.assert_type(got, jnp.float32)
            np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=prediction)


def test_wrong_shapes_give_clear_errors():
    x0, t = jnp.zeros((8, 4)), jnp.zeros((8,), jnp.int32)
    fn = lambda x, t: x
    with pytest.raises(
        ValueError, match=r"diffusion_loss: t must be int32 \[B\] = \(8,\), got float32 \(8, 1\)"
    ):
        losses.diffusion_loss(fn, SCHED, x0, jnp.zeros((8, 1)), x0)
    with pytest.raises(
        ValueError, match=r"diffusion_loss: noise must have the shape of x0 \(8, 4\), got \(4, 8\)"
    ):
        losses.diffusion_loss(fn, SCHED, x0, t, x0.T)
    with pytest.raises(
        ValueError, match=r"model_fn\(x_t, t\) must return .* \(8, 4\), got \(8, 1\)"
    ):
        losses.diffusion_loss(lambda x, t: x[:, :1], SCHED, x0, t, x0)
    with pytest.raises(ValueError, match=r"sample_timesteps_and_noise: x0 must be \[B, \.\.\.\]"):
        losses.sample_timesteps_and_noise(jax.random.PRNGKey(0), jnp.zeros((8,)), 50)
    with pytest.raises(ValueError, match=r"loss_weights: t must be int32 \[B\], got float32"):
        losses.loss_weights(SCHED, jnp.zeros((8,)), "eps", "min_snr")
