"""Tests for ddpm_jax.latent.vae_train: the autoencoder loss and training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from ddpm_jax.latent.vae_train import train_autoencoder, vae_loss
from ddpm_jax.models.autoencoder import AutoencoderKL

SMALL = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 8),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    mid_block_add_attention=False,
)


@pytest.fixture(scope="module")
def digits():
    """64 sklearn digits (8x8, 0..16) upsampled to 16x16, in [-1, 1]: [64, 16, 16, 1]."""
    images = load_digits().images[:64].astype(np.float32) / 8.0 - 1.0
    return jax.image.resize(jnp.asarray(images)[..., None], (64, 16, 16, 1), "bilinear")


def test_vae_loss_matches_numpy(digits):
    module = AutoencoderKL(**SMALL)
    x = digits[:4]
    params = module.init(jax.random.key(0), x, sample_posterior=False)
    key = jax.random.key(1)
    recon, mean, logvar = (np.asarray(a, np.float64) for a in module.apply(params, x, key))
    xn = np.asarray(x, np.float64)
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3))
    for recon_loss, err in [("l1", np.abs(recon - xn)), ("l2", (recon - xn) ** 2)]:
        loss, aux = vae_loss(params, module, x, key, kl_weight=0.01, recon_loss=recon_loss)
        expected = np.mean(err.sum(axis=(1, 2, 3)) + 0.01 * kl)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        np.testing.assert_allclose(aux["recon"], err.mean(), rtol=1e-5)
        np.testing.assert_allclose(aux["kl"], kl.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="recon_loss"):
        vae_loss(params, module, x, key, recon_loss="l3")


@pytest.mark.slow
def test_training_reduces_held_out_reconstruction_error(digits):
    module = AutoencoderKL(**SMALL)
    train, test = digits[:48], digits[48:]
    params, history = train_autoencoder(
        module, train, jax.random.key(0), num_steps=60, batch_size=16, learning_rate=3e-3
    )
    assert history["loss"].shape == history["recon"].shape == history["kl"].shape == (60,)
    assert np.isfinite(history["loss"]).all()
    assert history["recon"][-10:].mean() < 0.5 * history["recon"][:5].mean()

    def held_out_error(p):
        mean, _ = module.apply(p, test, method=AutoencoderKL.encode)
        return float(jnp.mean(jnp.abs(module.apply(p, mean, method=AutoencoderKL.decode) - test)))

    initial = module.init(jax.random.split(jax.random.key(0))[0], train[:1], sample_posterior=False)
    assert held_out_error(params) < 0.5 * held_out_error(initial)
    # Starting from given parameters continues training from them.
    more, _ = train_autoencoder(
        module, train, jax.random.key(1), num_steps=1, batch_size=16, params=params
    )
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), more, params)
    assert 0 < max(jax.tree.leaves(diff)) < 0.1


def test_train_autoencoder_validation(digits):
    module = AutoencoderKL(**SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        train_autoencoder(module, digits, jax.random.key(0), num_steps=1, batch_size=65)
    with pytest.raises(ValueError, match="num_steps"):
        train_autoencoder(module, digits, jax.random.key(0), num_steps=0)
    with pytest.raises(ValueError, match="images"):
        train_autoencoder(module, digits[..., 0], jax.random.key(0), num_steps=1)
    with pytest.raises(ValueError, match="recon_loss"):
        train_autoencoder(module, digits, jax.random.key(0), num_steps=1, recon_loss="l0")
