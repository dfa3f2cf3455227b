"""Tests for ddpm_jax.models.autoencoder (the diffusers loader: tests/test_weights_diffusers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from ddpm_jax.models.autoencoder import (
    AutoencoderKL,
    estimate_scale_factor,
    kl_to_standard_normal,
    sample_latent,
    scale_latents,
    unscale_latents,
)

TINY = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


@pytest.fixture(scope="module")
def tiny():
    module = AutoencoderKL(**TINY)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
    params = random_params(module, x, sample_posterior=False)
    return module, params, x


# ------------------------------------------------------------------------------------ module


def test_latent_shapes(tiny):
    module, params, x = tiny
    assert module.downsampling_factor == 4
    mean, logvar = module.apply(params, x, method=AutoencoderKL.encode)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    image = module.apply(params, mean, method=AutoencoderKL.decode)
    assert image.shape == (2, 32, 32, 1) and image.dtype == jnp.float32
    # Non-square inputs work too: 16 x 24 → 4 x 6 latents.
    m2, _ = module.apply(params, x[:, :16, :24], method=AutoencoderKL.encode)
    assert m2.shape == (2, 4, 6, 4)


def test_call_samples_posterior_or_uses_mean(tiny):
    module, params, x = tiny
    key = jax.random.key(5)
    recon, mean, logvar = module.apply(params, x, key)
    expected = module.apply(params, sample_latent(key, mean, logvar), method=AutoencoderKL.decode)
    np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-5)
    recon_mean, _, _ = module.apply(params, x, sample_posterior=False)
    np.testing.assert_allclose(
        recon_mean, module.apply(params, mean, method=AutoencoderKL.decode), rtol=1e-5, atol=1e-5
    )
    assert np.abs(np.asarray(recon - recon_mean)).max() > 1e-4
    with pytest.raises(ValueError, match="key"):
        module.apply(params, x)


def test_logvar_is_clipped_to_ldm_range(tiny):
    module, params, x = tiny
    for bias, bound in [(1e3, 20.0), (-1e3, -30.0)]:
        p = jax.tree.map(lambda a: a, params)
        b = p["params"]["quant_conv"]["bias"]
        p["params"]["quant_conv"]["bias"] = b.at[4:].set(bias)  # second half = log-variance
        mean, logvar = module.apply(p, x, method=AutoencoderKL.encode)
        np.testing.assert_array_equal(logvar, bound)
        assert np.abs(np.asarray(mean)).max() < 1e2


def test_config_validation():
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(**{**TINY, "norm_num_groups": 3}).init(jax.random.key(0), x, None, False)
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderKL(**{**TINY, "block_out_channels": ()}).init(jax.random.key(0), x, None, False)


# ------------------------------------------------------------------------------------ math


def test_sample_latent_has_posterior_moments():
    mean = jnp.full((20000, 2, 2, 1), 1.5)
    logvar = jnp.full_like(mean, np.log(0.25))
    z = np.asarray(sample_latent(jax.random.key(0), mean, logvar), np.float64)
    assert abs(z.mean() - 1.5) < 4 * 0.5 / np.sqrt(z.size)
    assert abs(z.std() - 0.5) < 0.01


def test_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4, 4, 2))
    logvar = rng.normal(size=(3, 4, 4, 2))
    expected = np.array(
        [
            sum(
                0.5 * (m**2 + np.exp(lv) - 1 - lv)
                for m, lv in zip(mean[b].ravel(), logvar[b].ravel(), strict=True)
            )
            for b in range(3)
        ]
    )
    kl = kl_to_standard_normal(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    assert kl.shape == (3,)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    np.testing.assert_allclose(kl_to_standard_normal(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_scale_factor_is_inverse_std_and_scaling_round_trips():
    z = 3.0 * jax.random.normal(jax.random.key(0), (64, 8, 8, 4)) + 0.7
    scale = estimate_scale_factor(z)
    np.testing.assert_allclose(scale, 1.0 / np.std(np.asarray(z, np.float64)), rtol=1e-5)
    assert abs(float(scale) - 1 / 3) < 0.01
    np.testing.assert_allclose(jnp.std(scale_latents(z, scale)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        unscale_latents(scale_latents(z, scale, 0.7), scale, 0.7), z, rtol=1e-5, atol=1e-5
    )
    assert AutoencoderKL().scaling_factor == 0.18215
    with pytest.raises(ValueError, match="latents"):
        estimate_scale_factor(jnp.ones((1,)))
