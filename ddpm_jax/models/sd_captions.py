"""The Stable Diffusion UNet conditioned on captions addressed by id, for the training engine.

:class:`CaptionUNet` gives an :class:`~ddpm_jax.models.sd_unet.SDUNet` the engine's interface,
``apply(variables, x, t, y=None, train=False, example_index=None)`` with ``null_label``: the label
``y`` indexes a constant table of text-encoder contexts ``[K, 77, D]`` (computed once by the frozen
text encoder), so that the engine's label dropout (``y -> null_label`` with probability
``train.p_uncond``) is caption dropout, and its guidance, grids and evaluation work unchanged.
Its variables are exactly the SD UNet's (``{"params": ...}`` of diffusers' names), so a
fine-tuned run's parameters drop into a loaded pipeline in place of the pretrained UNet's.

The table of a fine-tuning run (``ddpm_jax.latent.finetune_sd``) is laid out as ``[grid prompts
(G rows), the empty prompt (row G = null_label), the training captions]``: the engine's default
labels cycle through ``0 .. null_label - 1``, i.e. through the fixed prompts of the sample grids,
while the training examples carry the labels of their captions (> G).

Memory: the table is a constant of every compiled step and sampler, held on every device:
``K × 77 × D`` float32, e.g. 237 MB for 1,000 distinct captions of SD 1.x (D = 768), 316 MB of SD
2.x (D = 1024). A dataset with many more distinct captions needs per-example contexts instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.sd_unet import SDUNet


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionUNet:
    """An SD UNet whose conditioning label selects a row of a constant context table.

    Attributes:
      unet: the SD UNet.
      contexts: float32 ``[K, M, D]`` text-encoder states of each label (M = 77 for CLIP).
      null_label: the row of the empty prompt (the null condition of guidance), in ``[0, K)``.
    """

    unet: SDUNet
    contexts: np.ndarray
    null_label: int

    def __post_init__(self):
        k = np.shape(self.contexts)[0] if np.ndim(self.contexts) == 3 else 0
        if not 0 <= self.null_label < k:
            raise ValueError(f"null_label={self.null_label}: expected a row of contexts [K, M, D]")
        if np.shape(self.contexts)[-1] != self.unet.context_dim:
            raise ValueError(
                f"contexts of width {np.shape(self.contexts)[-1]}, the UNet's context_dim is "
                f"{self.unet.context_dim}"
            )

    def context(self, y: jax.Array | None, batch: int) -> jax.Array:
        """Rows ``y`` [B] of the table (the null row when None): [B, M, D] float32."""
        table = jnp.asarray(self.contexts, jnp.float32)
        if y is None:
            return jnp.broadcast_to(table[self.null_label], (batch, *table.shape[1:]))
        return table[jnp.asarray(y, jnp.int32)]

    def init(self, rngs: Any, x: jax.Array, t: jax.Array, y: jax.Array | None = None, **_):
        """Fresh variables of the UNet (the engine starts a fine-tuning run from given ones)."""
        return self.unet.init(rngs, x, t, self.context(y, x.shape[0]))

    def apply(
        self,
        variables: Any,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
        example_index: jax.Array | None = None,
        rngs: Any = None,
    ) -> jax.Array:
        """The UNet's prediction for latents ``x`` [B, h, w, c] at ``t`` [B] under labels ``y``.

        ``train``, ``example_index`` and ``rngs`` are the engine's; the SD UNet has no dropout.
        """
        del train, example_index, rngs
        return self.unet.apply(variables, x, t, self.context(y, x.shape[0]))


__all__ = ["CaptionUNet"]
