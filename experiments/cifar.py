"""DDPM on CIFAR-10: the recipe of Ho et al. (2020), sampled from the EMA parameters.

35.7M-parameter UNet (ch 128, ch_mult (1, 2, 2, 2), 2 residual blocks per level, attention at
16x16, dropout 0.1), linear β schedule 1e-4 → 0.02 over T = 1000 steps, ε-prediction with the
unweighted loss, batch 128, Adam 2e-4 with a 5,000-step linear warm-up, gradient clipping at
global norm 1.0, EMA decay 0.9999, random horizontal flips, 800k steps. Every 10k steps a grid of
64 EMA samples (fixed noise) is written; at the end ``samples.npz`` holds 1,000 EMA samples.

Usage::

    python -m experiments.cifar --workdir=runs/cifar10
    python -m experiments.cifar --workdir=runs/cifar10 --config.train.batch_size=256 \\
        --config.sample.num_samples=50000 --config.sample.method=ddpm --config.sample.num_steps=1000

CIFAR-10 must be prepared once with tfds (``pip install -e ".[prepare]"`` and network access, or
the downloaded archive in ``--config.data.manual_dir``); without it the command exits at once with
instructions. Flags: see ``ddpm_jax.cli``; running the same command again resumes.
"""

from __future__ import annotations

import ml_collections

from ddpm_jax import cli
from ddpm_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 configuration (Ho et al. 2020, Appendix B).

    ``default_config()`` is that recipe (its UNet is ``ddpm_jax.models.unet.CIFAR10_DDPM``); the
    experiment only fixes what the defaults leave open.
    """
    c = default_config()
    c.data.name = "cifar10"
    c.data.random_flip = True
    c.train.steps_per_call = 10  # one compiled call scans 10 steps (less dispatch, faster step)
    return c


if __name__ == "__main__":
    cli.main(get_config)
