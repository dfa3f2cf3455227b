"""Latent diffusion with class-name prompts on CIFAR-10 (for accelerators).

The recipe of ``experiments/latent_digits.py`` at CIFAR scale: a KL autoencoder from 32x32x3
images to 8x8x4 latents (trained first on the training split, then frozen; latents scaled by
1 / std), then a UNet with cross-attention to a jointly trained TextEncoder on prompts such as
"a photo of a cat" and "a cat" (prompts dropped with probability ``train.p_uncond``), sampled
with classifier-free guidance against the empty prompt and decoded.

Writes into ``--workdir``: ``vae.msgpack``, ``latent.json``, the run loop's checkpoints,
metrics and decoded training grids (``samples/``), ``prompts/<prompt>.png`` per prompt and
``samples.npz`` (``images`` uint8 [N, 32, 32, 3], ``labels`` = the class each prompt names).

CIFAR-10 must be available to tfds (``--config.data.data_dir`` / ``--config.data.manual_dir``);
offline without it the command stops within seconds with one line and exit code 2.

Usage: ``python -m experiments.cifar_latent --workdir=DIR [--config.x.y=v]``.
"""

from __future__ import annotations

import sys
import time

import ml_collections
import numpy as np

from ddpm_jax import cli, config as config_lib, data, runs
from ddpm_jax.latent import pipeline, prompts
from ddpm_jax.preemption import PreemptionGuard

CLASSES = (
    ("airplane", "plane"),
    ("automobile", "car"),
    ("bird",),
    ("cat",),
    ("deer",),
    ("dog",),
    ("frog",),
    ("horse",),
    ("ship", "boat"),
    ("truck",),
)
TEMPLATES = (
    "a photo of a {name}",
    "a {name}",
    "a picture of a {name}",
    "a blurry photo of the {name}",
)
HELDOUT_TEMPLATES = ("a photo of the {name}",)


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.default_config()
    c.data.name = "cifar10"
    c.latent = config_lib.latent_config()
    c.latent.image_size = 32
    c.latent.vae_block_out_channels = (64, 128, 128)
    c.latent.vae_layers_per_block = 2
    c.latent.vae_norm_num_groups = 32
    c.latent.vae_latent_channels = 4
    c.latent.vae_steps = 20_000
    c.latent.vae_batch_size = 128
    c.latent.vae_lr = 4.5e-4
    c.latent.text_width = 256
    c.latent.text_depth = 4
    c.latent.text_num_heads = 4
    c.latent.text_max_length = 8
    c.latent.samples_per_prompt = 100

    c.model.ch = 128
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (8, 4)
    c.model.dropout = 0.1
    c.model.num_heads = 4
    c.model.num_groups = 32
    c.model.class_conditional = True  # on the prompt id (see ddpm_jax.models.text.PromptUNet)

    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    # v: x0 = alpha x - sigma v stays bounded where alpha is small; with eps, DPM-Solver++'s
    # first steps (alpha_bar down to 4e-5 here) amplify eps errors by 1 / alpha (up to 158) and
    # nothing clips latents (see experiments/latent_digits.py, where eps failed this way).
    c.diffusion.prediction = "v"

    c.train.num_steps = 200_000
    c.train.batch_size = 256
    c.train.lr = 2e-4
    c.train.warmup_steps = 1000
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.sample_every = 10_000
    c.train.p_uncond = 0.1
    c.train.steps_per_call = 10

    c.sample.num_samples = 0  # samples.npz is written per prompt by this experiment
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 50
    c.sample.guidance_scale = 3.0
    c.sample.clip_x0 = None  # latents are not bounded
    c.sample.grid_size = 8
    c.sample.batch_size = 500
    return c


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    start_over: bool = False,
    allow_change: tuple[str, ...] = (),
) -> None:
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)
    d = config.data
    source, _ = data.load_tfds_source(
        d.name, split="train", data_dir=d.data_dir, manual_dir=d.manual_dir
    )
    n = len(source) if d.num_examples is None else min(len(source), d.num_examples)
    examples = [source[i] for i in range(n)]
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    log(f"loaded {n} training images {images.shape[1:]}")
    train_prompts, prompt_class = prompts.class_prompts(TEMPLATES, CLASSES)
    heldout, _ = prompts.class_prompts(HELDOUT_TEMPLATES, CLASSES)
    with PreemptionGuard() as preemption:  # SIGTERM in any phase: state saved, nothing final
        result = pipeline.train_latent(
            config, workdir, images, labels, train_prompts, prompt_class, log=log,
            preemption=preemption, start_over=start_over, allow_change=allow_change,
        )  # fmt: skip
        if result is None:
            return
        loaded, n = runs.load_run(workdir), config.latent.samples_per_prompt
        samples = prompts.sample_prompts(loaded, heldout, n, config.seed, preemption.reached)
        if samples is None:
            log("preempted (SIGTERM) while sampling: nothing written; run the same command again")
            return
    path = prompts.write_prompt_outputs(workdir, train_prompts + heldout, samples)
    log(f"wrote {workdir}/prompts/*.png and {path}")


def main(argv=None) -> None:
    cli.main(get_config, sys.argv if argv is None else argv, run_fn=run)


if __name__ == "__main__":
    main()
