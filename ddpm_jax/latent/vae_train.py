"""Training the KL autoencoder on its own: reconstruction + KL loss and a small optax loop.

The objective is the LDM first-stage loss without the perceptual and adversarial terms
(Rombach et al. 2022, App. G): per example, ``sum_pixels |x - x_rec|`` (L1, or squared error for
L2) plus ``kl_weight * KL(q(z | x) || N(0, I))``, averaged over the batch. With the small KL
weight of LDM (1e-6) the latent scale is nearly free; the diffusion model therefore sees latents
multiplied by :func:`ddpm_jax.models.autoencoder.estimate_scale_factor` of the trained encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax.models.autoencoder import AutoencoderKL, kl_to_standard_normal

_RECON_LOSSES = ("l1", "l2")


def vae_loss(
    params: Any,
    module: AutoencoderKL,
    x: jax.Array,
    key: jax.Array,
    kl_weight: float = 1e-6,
    recon_loss: str = "l1",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction + weighted KL loss of the autoencoder on a batch.

    Args:
        params: the module's variables, ``{"params": ...}``.
        module: the :class:`AutoencoderKL`.
        x: [B, H, W, C] float32 in [-1, 1].
        key: PRNG key for the posterior sample z ~ q(z | x).
        kl_weight: weight of the KL term (LDM uses 1e-6).
        recon_loss: "l1" (absolute error, as LDM) or "l2" (squared error).

    Returns:
        loss: scalar, ``mean_b [sum_pixels err_b + kl_weight * KL_b]``.
        aux: ``{"recon": mean per-pixel error, "kl": mean per-example KL, "loss": loss}``.
    """
    if recon_loss not in _RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r}: must be one of {_RECON_LOSSES}")
    recon, mean, logvar = module.apply(params, x, key, sample_posterior=True)
    diff = recon - x
    err = jnp.abs(diff) if recon_loss == "l1" else jnp.square(diff)
    err_sum = jnp.sum(err.reshape(err.shape[0], -1), axis=-1)
    kl = kl_to_standard_normal(mean, logvar)
    loss = jnp.mean(err_sum + kl_weight * kl)
    return loss, {"recon": jnp.mean(err), "kl": jnp.mean(kl), "loss": loss}


def vae_optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
    """Adam with the learning rate decayed along a cosine to 1% over ``num_steps``."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01))


def train_autoencoder(
    module: AutoencoderKL,
    images: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    recon_loss: str = "l1",
    params: Any = None,
    opt_state: Any = None,
    start_step: int = 0,
    callback: Callable[[int, Any, Any], bool] | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Train the autoencoder with Adam (cosine-decayed learning rate) on random minibatches.

    Args:
        module: the :class:`AutoencoderKL` to train.
        images: [N, H, W, C] float32 in [-1, 1]; H and W divisible by
            ``module.downsampling_factor``.
        key: PRNG key (initialisation, minibatch indices, posterior samples; folded per step).
        num_steps: optimisation steps.
        batch_size: examples per step, drawn without replacement within a step.
        learning_rate: peak Adam learning rate (cosine decay to 1% over ``num_steps``).
        kl_weight: weight of the KL term, see :func:`vae_loss`.
        recon_loss: "l1" or "l2", see :func:`vae_loss`.
        params: variables to start from; freshly initialised when None.
        opt_state / start_step: resume a run of this function: the optimizer state (of
            :func:`vae_optimizer`) after ``start_step`` steps; step ``i`` is the same
            computation whether or not the run was resumed.
        callback: ``callback(steps_done, params, opt_state) -> stop`` after every step (to
            checkpoint, or to stop early on a preemption notice).

    Returns:
        (params, history): trained variables ``{"params": ...}`` and per-step float32 arrays
        ``history["loss" | "recon" | "kl"]`` of the steps run.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if batch_size > images.shape[0]:
        raise ValueError(f"batch_size={batch_size}: must be <= number of images {images.shape[0]}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r}: must be > 0")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight={kl_weight!r}: must be >= 0")
    if recon_loss not in _RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r}: must be one of {_RECON_LOSSES}")

    init_key, loop_key = jax.random.split(key)
    if params is None:
        params = module.init(init_key, images[:1], sample_posterior=False)
    optimizer = vae_optimizer(learning_rate, num_steps)
    if opt_state is None:
        opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, step_index):
        batch_key, noise_key = jax.random.split(jax.random.fold_in(loop_key, step_index))
        idx = jax.random.choice(batch_key, images.shape[0], (batch_size,), replace=False)
        grads, aux = jax.grad(vae_loss, has_aux=True)(
            params, module, images[idx], noise_key, kl_weight, recon_loss
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    history = {"loss": [], "recon": [], "kl": []}
    for i in range(start_step, num_steps):
        params, opt_state, aux = step(params, opt_state, images, i)
        for name in history:
            history[name].append(aux[name])
        if callback is not None and callback(i + 1, params, opt_state):
            break
    stack = lambda v: np.asarray(jnp.stack(v), np.float32) if v else np.zeros(0, np.float32)
    return params, {name: stack(v) for name, v in history.items()}
