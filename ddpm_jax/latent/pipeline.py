"""A latent-diffusion run: frozen autoencoder → scaled latents → prompt-conditioned training loop.

:func:`train_latent` prepares the run once (``run_start.prepare``: config, work directory, trainer
lock, resume), trains (or reloads) the autoencoder of ``config.latent``, freezes it, encodes the
training images into scaled latents, pairs every image with every prompt that names its class
and trains a :class:`~ddpm_jax.models.text.PromptUNet` on those pairs with the ordinary run loop
(:func:`ddpm_jax.train.train`). It records ``latent.json`` (scale factor, prompts, the class of
each prompt, image and latent shapes), from which ``ddpm_jax.runs.load_run`` loads the run to
sample it (``ddpm_jax.latent.prompts.sample_prompts``, ``experiments.sample``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from ddpm_jax import builders, data, images, train
from ddpm_jax.latent import frozen_vae
from ddpm_jax.models.text import Tokenizer
from ddpm_jax.preemption import PreemptionGuard
from ddpm_jax.run_start import prepare, write_config
from ddpm_jax.workdir import is_writer, write_json

LATENT_FILE = "latent.json"


def train_latent(
    config: ml_collections.ConfigDict,
    workdir: str,
    images_uint8: np.ndarray,
    classes: np.ndarray,
    prompts: Sequence[str],
    prompt_class: np.ndarray,
    log: Callable[[str], None] = print,
    *,
    preemption: PreemptionGuard | None = None,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
    label_classes: np.ndarray | None = None,
) -> train.RunResult | None:
    """Latent diffusion end to end: frozen VAE → scaled latents → prompt-conditioned run loop.

    Every image is paired with every prompt naming its class (one dataset example per pair);
    ``train.p_uncond`` drops prompts to the empty one. A re-run on the same ``workdir`` is checked
    against the saved config first (``resume.check_resume``) and resumes whichever phase was
    interrupted; SIGTERM in either phase saves its state and returns None.

    Args:
      config: a ``default_config()`` with a ``latent`` section (``config.latent_config()``);
        ``config.model`` configures the UNet.
      workdir: the run's directory (``vae.msgpack``, ``latent.json`` and the run loop's files).
      images_uint8: [N, H, W, C] uint8 training images (resized to ``latent.image_size``).
      classes: [N] int32 class of each image.
      prompts: P prompts; ``prompt_class[p]`` is the class prompt ``p`` names.
      log: progress printer.
      preemption: the caller's active guard, to stop the autoencoder's training on SIGTERM (the
        diffusion phase has its own); None: that phase ignores preemption notices.
      start_over / allow_change: see ``ddpm_jax.run_start.prepare``.
      label_classes: [P] int32, the dataset class each prompt stands for in evaluation and
        ``samples.npz`` (recorded in ``latent.json``); None: ``prompt_class``.

    Returns:
      The run loop's ``RunResult``, or None when a preemption notice stopped the training.

    Raises:
      UsageError: an invalid config or work directory (before anything is compiled).
    """
    c = config.latent
    prompt_class = np.asarray(prompt_class, np.int32)
    label_classes = prompt_class if label_classes is None else np.asarray(label_classes, np.int32)
    if not len(prompts) == len(prompt_class) == len(label_classes):
        raise ValueError("prompts, prompt_class and label_classes must have the same length")
    with prepare(config, workdir, start_over=start_over, allow_change=allow_change) as start:
        workdir = start.workdir
        tokenizer = Tokenizer.from_prompts(prompts, max_length=c.text_max_length)
        model = builders.build_prompt_unet(config, tokenizer, prompts)
        if images_uint8.shape[1:3] != (c.image_size, c.image_size):
            images_uint8 = images.resize(images_uint8, (c.image_size, c.image_size))
        x = images_uint8.astype(np.float32) / 127.5 - 1.0
        write_config(workdir, config, replace=False)  # a re-run of the VAE phase compares too
        vae_and_params = frozen_vae.load_or_train_vae(config, workdir, x, log, preemption)
        if vae_and_params is None:
            return None
        vae, vae_params = vae_and_params
        latents, scale = frozen_vae.encode_latents(vae, vae_params, x)
        log(f"latents {latents.shape[1:]} (scale factor 1/std = {scale:.4f})")
        if is_writer():
            info = dict(
                scale_factor=scale,
                prompts=list(prompts),
                prompt_classes=label_classes.tolist(),
                image_shape=list(x.shape[1:]),
                latent_shape=list(latents.shape[1:]),
            )
            write_json(os.path.join(workdir, LATENT_FILE), info)

        # One example per (image, prompt naming its class).
        by_class = {k: np.flatnonzero(prompt_class == k) for k in np.unique(prompt_class)}
        rows, labels = [], []
        for i, k in enumerate(np.asarray(classes)):
            for p in by_class.get(int(k), ()):
                rows.append(i)
                labels.append(p)
        if not rows:
            raise ValueError("no image has a class that a prompt names")
        dataset = data.array_dataset(
            latents[np.asarray(rows)],
            np.asarray(labels, np.int32),
            num_classes=len(prompts),
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            name="latents",
        )
        if preemption is not None and preemption.reached():
            log("preempted (SIGTERM) before the diffusion phase; run the same command again")
            return None
        decode_fn = frozen_vae.make_decode_fn(vae, vae_params, scale)
        result = train.train(
            config, start, dataset, model, decode_fn=decode_fn, label_classes=label_classes
        )
    return None if result.status == "preempted" else result


__all__ = ["LATENT_FILE", "train_latent"]
