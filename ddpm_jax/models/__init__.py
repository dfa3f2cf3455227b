"""Flax networks: the DDPM UNet, the latent-diffusion autoencoder and the text encoder.

A plain re-export of the names most callers need; the modules are ``ops.py`` (kernels, plain
XLA or CPU-tuned by ``kernels=``), ``cpu_kernels.py`` (the CPU-tuned custom VJPs), ``layers.py``
and ``attention.py`` (blocks), ``unet.py``, ``autoencoder.py``, ``text.py`` and ``inception.py``.
"""

from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.layers import timestep_embedding
from ddpm_jax.models.text import TextEncoder, Tokenizer
from ddpm_jax.models.unet import CIFAR10_DDPM, UNet, cifar10_ddpm

__all__ = [
    "CIFAR10_DDPM",
    "AutoencoderKL",
    "TextEncoder",
    "Tokenizer",
    "UNet",
    "cifar10_ddpm",
    "timestep_embedding",
]
