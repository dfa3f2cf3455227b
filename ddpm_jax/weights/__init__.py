"""Weights written by other frameworks, read into our Flax modules without torch.

- :mod:`ddpm_jax.weights.pth`: the safe reader of ``torch.save`` files (no arbitrary
  unpickling).
- :mod:`ddpm_jax.weights.diffusers`: checkpoints in the diffusers layout (the Stable-Diffusion
  VAE, and the file reading and key conversion the other diffusers loaders share).
- :mod:`ddpm_jax.weights.diffusers_unet`: a diffusers ``UNet2DModel`` (the published DDPM
  checkpoints) in our UNet.
- :mod:`ddpm_jax.weights.diffusers_pipeline`: a DDPM / DDIM pipeline folder: the UNet plus the
  schedule, prediction type, clipping and variance of its ``scheduler_config.json``.
- :mod:`ddpm_jax.weights.stable_diffusion`: a Stable-Diffusion (1.x / 2.x) pipeline folder, through
  :mod:`~ddpm_jax.weights.diffusers_sd_unet` (the UNet), :mod:`~ddpm_jax.weights.clip_weights`
  (CLIP's text encoder) and :mod:`~ddpm_jax.weights.clip_tokenizer` (its tokenizer).
- :mod:`ddpm_jax.weights.fid_inception`: pytorch-fid's FID Inception weights (download + load).

A missing or damaged file, or one that does not fit the network, raises
:class:`ddpm_jax.errors.UsageError` with one line naming the file. This package imports
``ddpm_jax.models``, never the reverse.
"""

from ddpm_jax.weights.diffusers import load_diffusers_vae
from ddpm_jax.weights.diffusers_pipeline import DiffusersPipeline, load_diffusers_pipeline
from ddpm_jax.weights.diffusers_unet import load_diffusers_unet
from ddpm_jax.weights.fid_inception import (
    FID_WEIGHTS_URL,
    download_fid_weights,
    inception_from_pth,
    variables_from_torch,
)
from ddpm_jax.weights.pth import UnsafePickleError, load_pth, load_state_dict
from ddpm_jax.weights.stable_diffusion import StableDiffusion, load_stable_diffusion

__all__ = [
    "FID_WEIGHTS_URL",
    "DiffusersPipeline",
    "StableDiffusion",
    "UnsafePickleError",
    "download_fid_weights",
    "inception_from_pth",
    "load_diffusers_pipeline",
    "load_diffusers_unet",
    "load_diffusers_vae",
    "load_pth",
    "load_state_dict",
    "load_stable_diffusion",
    "variables_from_torch",
]
