"""The ``finetune`` section of a Stable Diffusion fine-tuning run (``experiments.finetune_sd``).

Fields (:func:`finetune_config`):

- ``pretrained``: the diffusers ``StableDiffusionPipeline`` folder whose UNet is fine-tuned (the
  ``--pretrained`` flag). Its UNet architecture, noise schedule and prediction replace
  ``config.model`` (only ``model.dtype`` and ``model.kernels`` apply) and ``config.diffusion``;
  its VAE and text encoder stay frozen. A run records the folder's fingerprint and refuses to
  resume from another model (the path itself may change).
- ``grid_prompts``: the fixed prompts of the sample grids, of ``samples.npz`` and of the
  evaluation during training (labels cycle through them); empty: the first
  ``sample.grid_size`` distinct captions of the folder (sorted).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from ddpm_jax.config_fields import fail, get
from ddpm_jax.folder_source import FOLDER

SECTION = "finetune"


def finetune_config() -> ml_collections.ConfigDict:
    """Defaults of the ``finetune`` section (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.pretrained = config_dict.placeholder(str)
    c.grid_prompts = ()
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the ``finetune`` section (when present) and what it needs of ``data``.

    Raises:
      UsageError: naming the field, its value and what is allowed.
    """
    if SECTION not in config:
        return
    unknown = sorted(set(config.finetune.keys()) - set(finetune_config().keys()))
    if unknown:
        fail(f"{SECTION}", unknown, f"unknown field(s); allowed: {sorted(finetune_config())}")
    pretrained = get(config, "finetune.pretrained")
    if not isinstance(pretrained, str) or not pretrained.strip():
        fail(
            "finetune.pretrained",
            pretrained,
            "pass --pretrained=SD_DIR, a diffusers Stable Diffusion pipeline folder",
        )
    prompts = get(config, "finetune.grid_prompts")
    ok = isinstance(prompts, tuple | list) and all(isinstance(p, str) and p for p in prompts)
    if not ok:
        fail("finetune.grid_prompts", prompts, "expected a tuple of non-empty prompts")
    if get(config, "data.name") != FOLDER:
        fail("data.name", config.data.name, "fine-tuning reads a folder of captioned images")
    if get(config, "data.crop") != "center":
        fail("data.crop", config.data.crop, "latents are encoded once: expected 'center'")
    if get(config, "data.random_flip"):
        fail("data.random_flip", True, "latents are encoded once: expected False or None")


__all__ = ["SECTION", "finetune_config", "validate"]
