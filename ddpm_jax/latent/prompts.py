"""Prompts of a latent run: the prompts that name each class, sampling from any prompt, and the
per-prompt outputs (a PNG grid per prompt and ``samples.npz``)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import guidance, samplers, schedules
from ddpm_jax import images as images_lib
from ddpm_jax.models.text import PAD_ID, PromptUNet
from ddpm_jax.parallel import compiler_options
from ddpm_jax.workdir import FINAL_TAG, is_writer, run_key, save_npz


def class_prompts(
    templates: Sequence[str], class_names: Sequence[Sequence[str]]
) -> tuple[list[str], np.ndarray]:
    """Every phrasing of every class: ``template.format(name=name, index=c)``, without repeats.

    Args:
      templates: e.g. ``["a handwritten {name}", "the digit {index}"]``.
      class_names: per class ``c``, one or more names, e.g. ``[["zero"], ["one"], ...]``.

    Returns:
      prompts: the P prompts, class by class, template by template, name by name.
      prompt_class: [P] int32, the class each prompt names.
    """
    prompts, classes = [], []
    for c, names in enumerate(class_names):
        for template in templates:
            for name in names:
                text = template.format(name=name, index=c)
                if text not in prompts:
                    prompts.append(text)
                    classes.append(c)
    return prompts, np.asarray(classes, np.int32)


def sample_from_tokens(
    model: PromptUNet,
    params: Any,
    schedule: schedules.Schedule,
    key: jax.Array,
    tokens: np.ndarray,
    latent_shape: Sequence[int],
    *,
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    guidance_scale: float = 1.0,
    method: str = "ddim",
    num_steps: int = 50,
    prediction: str = "eps",
    clip_x0: float | None = None,
) -> jax.Array:
    """Samples one latent per token row with classifier-free guidance against the empty prompt.

    Args:
      model: the :class:`~ddpm_jax.models.text.PromptUNet`.
      params: its (EMA) variables.
      schedule: the noise schedule it was trained with.
      key: PRNG key of the initial noise and the sampler.
      tokens: [B, L] int32 prompts (``Tokenizer.encode``); unknown words are ``UNK_ID``.
      latent_shape: (h, w, c) of one latent.
      decode_fn: latents → images (``frozen_vae.make_decode_fn``); None returns latents.
      guidance_scale / method / num_steps / prediction / clip_x0: see ``samplers.sample``.

    Returns:
      [B, ...] images in [-1, 1] (decoded) or latents.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    shape = (tokens.shape[0], *latent_shape)
    model_fn = lambda x, t, tokens: model.apply(params, x, t, tokens, method=PromptUNet.from_tokens)
    null = jnp.full((tokens.shape[1],), PAD_ID, jnp.int32)
    guided = guidance.classifier_free(model_fn, guidance_scale, null_cond={"tokens": null})
    z = samplers.sample(
        lambda x, t: guided(x, t, tokens=tokens),
        schedule,
        key,
        shape,
        method=method,
        num_steps=num_steps,
        prediction=prediction,
        clip_x0=clip_x0,
    )
    return z if decode_fn is None else decode_fn(z)


def sample_prompt_images(
    config: ml_collections.ConfigDict,
    run: Any,
    prompts: Sequence[str],
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray | None:
    """``config.latent.samples_per_prompt`` decoded samples of every prompt, with guidance.

    Uses the EMA parameters of ``run`` (a ``ddpm_jax.latent.pipeline.LatentRun``),
    ``config.sample``'s ``method, num_steps, guidance_scale, clip_x0, batch_size`` and
    ``config.diffusion.prediction``; prompts may be any text (unknown words become UNK).
    Deterministic in ``config.seed``.

    Returns:
      uint8 [len(prompts), samples_per_prompt, H, W, C]; None when ``should_stop()`` became
      true (checked after each batch, e.g. a preemption notice).
    """
    s, n = config.sample, config.latent.samples_per_prompt
    sample_fn = jax.jit(
        lambda params, key, tokens, scale: sample_from_tokens(
            run.model,
            params,
            run.schedule,
            key,
            tokens,
            run.latent_shape,
            decode_fn=run.decode_fn,
            guidance_scale=scale,
            method=s.method,
            num_steps=s.num_steps,
            prediction=config.diffusion.prediction,
            clip_x0=s.clip_x0,
        ),
        compiler_options=compiler_options(),
    )
    tokens, _ = run.tokenizer.encode([p for p in prompts for _ in range(n)])
    key = run_key(config.seed, FINAL_TAG)
    batch = min(len(tokens), max(n, s.batch_size // n * n))
    out = []
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        imgs = sample_fn(run.result.ema_params, jax.random.fold_in(key, i), chunk, s.guidance_scale)
        out.append(np.asarray(images_lib.to_uint8(imgs))[: batch - pad])
        if should_stop is not None and should_stop():
            return None
    out = np.concatenate(out)
    return out.reshape(len(prompts), n, *out.shape[1:])


def write_prompt_outputs(
    workdir: str, prompts: Sequence[str], samples: np.ndarray, prompt_class: np.ndarray
) -> str:
    """Writes ``prompts/<prompt>.png`` grids for all ``prompts`` and ``samples.npz`` for the
    first ``len(prompt_class)`` of them (``images`` [N, H, W, C] uint8, ``labels`` [N] int32 =
    the class each sample's prompt names), from process 0. Returns the path of ``samples.npz``."""
    path = os.path.join(workdir, "samples.npz")
    if not is_writer():
        return path
    n = samples.shape[1]
    cols = int(np.ceil(np.sqrt(n)))
    for p, imgs in zip(prompts, samples, strict=True):
        slug = re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")
        images_lib.save_png_grid(os.path.join(workdir, "prompts", f"{slug}.png"), imgs, cols)
    k = len(prompt_class)
    return save_npz(
        path,
        images=samples[:k].reshape(k * n, *samples.shape[2:]),
        labels=np.repeat(np.asarray(prompt_class, np.int32), n),
    )


__all__ = [
    "class_prompts",
    "sample_from_tokens",
    "sample_prompt_images",
    "write_prompt_outputs",
]
