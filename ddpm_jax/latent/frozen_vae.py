"""The frozen autoencoder of a latent run: train once or load, encode to latents, decode samples.

The autoencoder is trained first (:func:`load_or_train_vae`, saved as ``vae.msgpack`` in the
work directory so that a resumed run reuses it) and then never changes: the training images are
encoded once into latents multiplied by the scale factor ``1 / std(latents)``
(:func:`encode_latents`), and samples are decoded with the autoencoder's variables captured as
constants (:func:`make_decode_fn`). Its parameters are therefore neither in the diffusion
optimizer nor reachable by gradients.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import builders
from ddpm_jax.errors import UsageError
from ddpm_jax.latent.vae_train import train_autoencoder, vae_optimizer
from ddpm_jax.models.autoencoder import (
    AutoencoderKL,
    estimate_scale_factor,
    scale_latents,
    unscale_latents,
)
from ddpm_jax.preemption import PreemptionGuard
from ddpm_jax.workdir import VAE_TAG, atomic_open, is_writer, run_key

VAE_FILE = "vae.msgpack"  # the frozen autoencoder
TRAINING_FILE = "vae_training.msgpack"  # its training state, to resume the training exactly


def _template(vae: AutoencoderKL, seed: int, image_shape) -> Any:
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: vae.init(run_key(seed, VAE_TAG), x, sample_posterior=False), x)


def load_vae(
    config: ml_collections.ConfigDict, workdir: str, image_shape
) -> tuple[AutoencoderKL, Any]:
    """The run's frozen autoencoder from ``workdir/vae.msgpack``.

    Args:
      config: the run's config (``config.latent`` builds the autoencoder).
      workdir: the run's directory.
      image_shape: ``(H, W, C)`` of the images it encodes.

    Raises:
      UsageError: the file is missing or does not match ``config.latent``.
    """
    vae = builders.build_vae(config, image_shape[-1])
    path = os.path.join(workdir, VAE_FILE)
    if not os.path.exists(path):
        raise UsageError(f"{path} is missing: the latent run's autoencoder was never trained")
    with open(path, "rb") as f:
        try:
            params = flax.serialization.from_bytes(
                _template(vae, config.seed, image_shape), f.read()
            )
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} does not match config.latent ({e})") from e
    return vae, params


def load_or_train_vae(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: np.ndarray,
    log: Callable[[str], None] = print,
    preemption: PreemptionGuard | None = None,
) -> tuple[AutoencoderKL, Any] | None:
    """The frozen autoencoder of a run: ``workdir/vae.msgpack`` if present, else trained on
    ``images`` ([N, H, W, C] float32 in [-1, 1]) and saved there (so a resumed run reuses it).

    Training resumes exactly: its state is saved to ``vae_training.msgpack`` every
    ``config.train.checkpoint_every`` steps and on a preemption notice, and step ``i`` draws its
    batch and noise from ``(seed, i)`` alone.

    Returns:
      ``(vae, params)``, or None when ``preemption`` asked to stop (the state was saved).
    """
    if os.path.exists(os.path.join(workdir, VAE_FILE)):
        log(f"loaded the frozen autoencoder from {os.path.join(workdir, VAE_FILE)}")
        return load_vae(config, workdir, images.shape[1:])
    vae = builders.build_vae(config, images.shape[-1])
    c, every = config.latent, config.train.checkpoint_every
    key = run_key(config.seed, VAE_TAG)
    params = _template(vae, config.seed, images.shape[1:])
    opt_state = jax.eval_shape(vae_optimizer(c.vae_lr, c.vae_steps).init, params)
    state_path = os.path.join(workdir, TRAINING_FILE)
    start = 0
    if os.path.exists(state_path):
        with open(state_path, "rb") as f:
            template = {"step": 0, "params": params, "opt_state": opt_state}
            state = flax.serialization.from_bytes(template, f.read())
        start, params, opt_state = int(state["step"]), state["params"], state["opt_state"]
        log(f"resuming the autoencoder's training from step {start} ({state_path})")
    else:
        params = opt_state = None
    stopped = []

    def save(step: int, params: Any, opt_state: Any) -> None:
        if is_writer():
            state = {"step": step, "params": params, "opt_state": opt_state}
            with atomic_open(state_path, "wb") as f:
                f.write(flax.serialization.to_bytes(jax.device_get(state)))

    def callback(step: int, params: Any, opt_state: Any) -> bool:
        if preemption is not None and preemption.reached():
            save(step, params, opt_state)
            stopped.append(step)
            return True
        if step % every == 0 and step < c.vae_steps:
            save(step, params, opt_state)
        return False

    t0 = time.time()
    params, hist = train_autoencoder(
        vae,
        images,
        key,
        num_steps=c.vae_steps,
        batch_size=min(c.vae_batch_size, len(images)),
        learning_rate=c.vae_lr,
        kl_weight=c.vae_kl_weight,
        params=params,
        opt_state=opt_state,
        start_step=start,
        callback=callback,
    )
    if stopped:
        log(f"preempted (SIGTERM): saved the autoencoder's training at step {stopped[0]}")
        return None
    recon = f", final train L1 {np.mean(hist['recon'][-20:]):.4f}" if len(hist["recon"]) else ""
    log(f"autoencoder: {c.vae_steps - start} steps in {time.time() - t0:.0f} s{recon}")
    if is_writer():
        with atomic_open(os.path.join(workdir, VAE_FILE), "wb") as f:
            f.write(flax.serialization.to_bytes(jax.device_get(params)))
    return vae, params


def encode_latents(
    vae: AutoencoderKL,
    vae_params: Any,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    scale_factor: float | None = None,
) -> tuple[np.ndarray, float]:
    """Encodes images with the frozen VAE (posterior mean) into scaled diffusion latents.

    Args:
      vae: the autoencoder module.
      vae_params: its variables (read only).
      images: [N, H, W, C] float32 in [-1, 1].
      batch_size: images per encoder call.
      scale_factor: multiply latents by this; None estimates ``1 / std`` from these latents
        (Rombach et al. Sec. 4.3.2).

    Returns:
      (latents [N, H/f, W/f, latent_channels] float32 = mean * scale_factor, scale_factor).
    """
    encode = jax.jit(lambda x: vae.apply(vae_params, x, method=AutoencoderKL.encode)[0])
    images = np.asarray(images, np.float32)
    means = np.concatenate(
        [np.asarray(encode(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )
    if scale_factor is None:
        scale_factor = float(estimate_scale_factor(means))
    return np.asarray(scale_latents(means, scale_factor), np.float32), float(scale_factor)


def make_decode_fn(
    vae: AutoencoderKL, vae_params: Any, scale_factor: float
) -> Callable[[jax.Array], jax.Array]:
    """Scaled diffusion latents [B, h, w, c] → images [B, H, W, C] in [-1, 1] (jittable).

    The VAE variables are closed over as constants: decoding never differentiates them.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, vae_params)

    def decode(z: jax.Array) -> jax.Array:
        x = vae.apply(frozen, unscale_latents(z, scale_factor), method=AutoencoderKL.decode)
        return jnp.clip(x, -1.0, 1.0)

    return decode


__all__ = [
    "TRAINING_FILE",
    "VAE_FILE",
    "encode_latents",
    "load_or_train_vae",
    "load_vae",
    "make_decode_fn",
]
