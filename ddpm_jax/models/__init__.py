"""Flax networks: the DDPM UNet and its building blocks (see ``unet.py`` and ``layers.py``)."""

from ddpm_jax.models.layers import timestep_embedding
from ddpm_jax.models.unet import CIFAR10_DDPM, UNet, cifar10_ddpm

__all__ = ["CIFAR10_DDPM", "UNet", "cifar10_ddpm", "timestep_embedding"]
