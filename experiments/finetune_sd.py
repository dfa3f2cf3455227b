"""Fine-tune a Stable Diffusion UNet on a folder of captioned images.

::

    python -m experiments.finetune_sd --workdir=runs/sd_mine --pretrained=stable-diffusion-v1-5 \\
        --config.data.dir=PATH [--config.model.dtype=bfloat16] [--config.parallel=fsdp]
    python -m experiments.sample --workdir=runs/sd_mine --prompt="a red fox" --num_samples=4

Every image of ``PATH`` needs a caption (``metadata.jsonl`` lines ``{"file_name", "text"}``, or a
``.txt`` file beside the image). The VAE and the text encoder stay frozen: the images are encoded
once into scaled latents (the VAE posterior's mean) and the captions once into text states, cached
in the workdir; the UNet starts from the pretrained parameters and trains with the engine (EMA,
checkpoints, exact resume, preemption, bf16, ``shard_map`` / ``fsdp``, grids and evaluation of
``finetune.grid_prompts``), captions dropped to the empty prompt with probability
``train.p_uncond`` (classifier-free guidance). See ``ddpm_jax.latent.finetune_sd``.

The UNet, noise schedule (``num_timesteps``, prediction) and image size (``data.image_size``,
default: the UNet's ``sample_size`` times the VAE's factor) come from the pretrained folder;
``config.model`` sets only ``dtype`` and ``kernels``. The defaults follow diffusers'
``train_text_to_image`` example (learning rate 1e-5 constant, gradient clipping 1, EMA,
15,000 steps) with Adam, as the engine trains (no weight decay). Running the same command again
resumes; a resume with another pretrained model is refused (exit code 2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import ml_collections

from ddpm_jax import cli, config_finetune, folder_source
from ddpm_jax.config import default_config
from ddpm_jax.errors import UsageError


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.finetune = config_finetune.finetune_config()
    c.data.name = folder_source.FOLDER
    c.data.random_flip = False
    c.train.num_steps = 15_000
    c.train.batch_size = 8
    c.train.lr = 1e-5
    c.train.warmup_steps = 0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.p_uncond = 0.1
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.sample_every = 1000
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 25
    c.sample.guidance_scale = 7.5
    c.sample.clip_x0 = None  # latents are not bounded
    c.sample.grid_size = 2  # the first grid prompts, one per column
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    return c


def adapt(config: ml_collections.ConfigDict) -> None:
    """The pretrained folder's facts into the config (after the flags, before validation)."""
    cli.guarded(_adapt, config)


def _adapt(config: ml_collections.ConfigDict) -> None:
    from ddpm_jax.latent.stable_diffusion import is_pipeline_folder
    from ddpm_jax.weights import diffusers, stable_diffusion as sd

    path = config.finetune.pretrained
    if not path:
        raise UsageError("--pretrained=SD_DIR is required: a diffusers Stable Diffusion folder")
    if not is_pipeline_folder(path):
        raise UsageError(
            f"--pretrained={path}: not a Stable Diffusion pipeline folder (a model_index.json "
            "naming unet, vae, text_encoder, tokenizer and scheduler)"
        )
    scheduler = os.path.join(path, "scheduler", sd.SCHEDULER_CONFIG_NAME)
    read = diffusers.read_config
    settings = sd.scheduler_from_config(read(scheduler), source=scheduler)
    config.diffusion.num_timesteps = settings.schedule.num_timesteps
    config.diffusion.prediction = settings.prediction
    vae = read(os.path.join(path, "vae", "config.json"))
    if config.data.channels is None:
        config.data.channels = int(vae.get("in_channels", 3))
    size = read(os.path.join(path, "unet", "config.json")).get("sample_size")
    if config.data.image_size is None and isinstance(size, int):
        config.data.image_size = size * 2 ** (len(vae.get("block_out_channels", (1,))) - 1)


def pretrained_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--pretrained=DIR`` (or ``--pretrained DIR``) as
    ``--config.finetune.pretrained=DIR``."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--pretrained" and i + 1 < len(args):
            out.append(f"--config.finetune.pretrained={args[i + 1]}")
            i += 2
            continue
        if arg.startswith("--pretrained="):
            arg = "--config.finetune.pretrained=" + arg.partition("=")[2]
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None):
    from ddpm_jax.latent.finetune_sd import finetune

    argv = pretrained_flag(sys.argv if argv is None else argv)
    return cli.main(get_config, argv, run_fn=finetune, adapt=adapt)


if __name__ == "__main__":
    main()
