"""Prompts of a latent run: the prompts that name each class, the samples of a trained run's prompts
and of any other prompt (through ``runs.load_run`` and ``Generator``, like ``experiments.sample``),
and a PNG grid per prompt."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from ddpm_jax import images as images_lib
from ddpm_jax.runs import LoadedRun
from ddpm_jax.workdir import FINAL_TAG, PROMPT_TAG, is_writer, run_key, save_npz


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


class PromptSamples(NamedTuple):
    """What :func:`sample_prompts` drew.

    Attributes:
      images: uint8 ``[P n, H, W, C]``, the samples of the run's P prompts, sample ``i`` of
        prompt ``i % P`` (the order of ``Generator``'s labels, so ``experiments.sample`` draws
        them again with ``--num_samples`` = P n): ``samples.npz``.
      classes: int32 ``[P n]``, the class each sample's prompt names.
      by_prompt: uint8 ``[P + Q, n, H, W, C]``, the same samples grouped by prompt, then ``n`` of
        each of the Q other prompts.
    """

    images: np.ndarray
    classes: np.ndarray
    by_prompt: np.ndarray


def sample_prompts(
    run: LoadedRun,
    other_prompts: Sequence[str],
    samples_per_prompt: int,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> PromptSamples | None:
    """``samples_per_prompt`` decoded samples of each prompt of a latent run, then of other
    prompts (any text: unknown words become UNK), with the run's sample settings and guidance
    against the empty prompt, sharded over every device.

    The run's own prompts are one ``Generator`` call of P n samples from
    ``run_key(seed, FINAL_TAG)``; the other prompts one call from ``run_key(seed, PROMPT_TAG)``.

    Args:
      run: a latent run from ``ddpm_jax.runs.load_run``.
      other_prompts: Q prompts it was not trained on (held-out phrasings).
      samples_per_prompt: n.
      seed: the run's seed.
      should_stop: asked after each sampling round on every process (e.g. a preemption guard's
        ``reached``); when it says True, None is returned.
    """
    n, num_prompts = samples_per_prompt, run.model.num_prompts
    generator = run.generator()
    out = generator(
        run.ema_params, run_key(seed, FINAL_TAG), num_prompts * n, should_stop=should_stop
    )
    if out is None:
        return None
    imgs, labels = out
    grouped = [imgs.reshape(n, num_prompts, *imgs.shape[1:]).swapaxes(0, 1)]
    if other_prompts:
        tokens, _ = run.tokenizer.encode([p for p in other_prompts for _ in range(n)])
        key = run_key(seed, PROMPT_TAG)
        out = generator(run.ema_params, key, len(tokens), tokens=tokens, should_stop=should_stop)
        if out is None:
            return None
        grouped.append(out[0].reshape(len(other_prompts), n, *imgs.shape[1:]))
    return PromptSamples(imgs, run.classes_of(labels), np.concatenate(grouped))


def write_prompt_outputs(workdir: str, prompts: Sequence[str], samples: PromptSamples) -> str:
    """Writes ``samples.npz`` (``images``, ``labels`` = the classes) and a ``prompts/<prompt>.png``
    grid of each prompt's samples (``prompts``: the run's, then the others), from process 0.
    Returns the path of ``samples.npz``."""
    path = os.path.join(workdir, "samples.npz")
    if not is_writer():
        return path
    cols = int(np.ceil(np.sqrt(samples.by_prompt.shape[1])))
    for p, imgs in zip(prompts, samples.by_prompt, strict=True):
        slug = re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")
        images_lib.save_png_grid(os.path.join(workdir, "prompts", f"{slug}.png"), imgs, cols)
    return save_npz(path, images=samples.images, labels=samples.classes)


__all__ = ["PromptSamples", "class_prompts", "sample_prompts", "write_prompt_outputs"]
