"""EDM on CIFAR-10: the training and sampling settings of Karras et al. (2022), config F of their
Table 2 for CIFAR-10 (VP architecture, EDM preconditioning, loss and sampler), on our UNet.

Matched: the EDM preconditioning with σ_data = 0.5, ln σ ~ N(-1.2, 1.2²) and the EDM loss weight
(``diffusion.formulation=edm``); Adam (lr 1e-3, β = (0.9, 0.999), ε = 1e-8) with batch 512, a
linear warm-up over 10 Mimg (19,531 steps), no gradient clipping, EMA with a half-life of
0.5 Mimg (decay 0.5^(512 / 500,000) = 0.99929 per step), 200 Mimg of training (390,625 steps),
dropout 0.13; the deterministic Heun sampler with 18 steps (35 network evaluations), σ from
0.002 to 80 with ρ = 7.

Not matched: EDM's DDPM++ network (55.7M parameters: ch 128, ch_mult (2, 2, 2), 4 residual
blocks per level, attention at 16x16, skip connections scaled by 1/√2, FIR-free resampling) is
approximated by our UNet with the same widths, blocks and attention (``model.*`` below; 53.6M
parameters), which keeps DDPM's residual blocks and resampling; EDM's non-leaking augmentation
pipeline (p = 0.12, with the augmentation labels fed to the network) is not implemented: random
horizontal flips stand in; EDM samples in float64, we in float32. Expect FID above EDM's 1.97.

Usage::

    python -m experiments.cifar_edm --workdir=runs/cifar10_edm
"""

from __future__ import annotations

import ml_collections

from ddpm_jax import cli
from experiments import cifar


def get_config() -> ml_collections.ConfigDict:
    """EDM's CIFAR-10 configuration on our UNet (see the module docstring)."""
    c = cifar.get_config()
    c.diffusion.formulation = "edm"
    c.diffusion.sigma_data = 0.5
    c.model.ch = 128
    c.model.ch_mult = (2, 2, 2)
    c.model.num_res_blocks = 4
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.13
    c.train.batch_size = 512
    c.train.lr = 1e-3
    c.train.warmup_steps = 19_531  # 10 Mimg
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.99929  # half-life 0.5 Mimg at batch 512
    c.train.num_steps = 390_625  # 200 Mimg
    c.sample.method = "heun"
    c.sample.num_steps = 18  # 35 network evaluations
    c.eval.method = "heun"
    c.eval.num_steps = 18
    return c


if __name__ == "__main__":
    cli.main(get_config)
