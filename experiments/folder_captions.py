"""A captioned folder of images: the latent text-conditioned recipe of ``experiments.folder``.

When every image of ``data.dir`` has a caption (``metadata.jsonl`` or a ``.txt`` beside it) and
``data.captions`` is not False (True: required), ``experiments.folder`` trains the recipe of
``experiments.latent_digits`` on the captions: a KL autoencoder to latents (trained first, then
frozen), then a UNet with cross-attention to a jointly trained word-level text encoder, each image
paired with its caption (``ddpm_jax.latent.captions``: the distinct captions, normalised to their
words, are the prompts), prompts dropped with ``train.p_uncond`` for classifier-free guidance.
The autoencoder halves the side until the latents are 8x8 (at most 3 times: 16 px → 8x8x4,
32 px → 8x8x4, 64 px → 8x8x4, 128 px → 16x16x4); ``latent.text_max_length`` is the longest
caption's words (at least 6).

Writes into ``--workdir``: ``folder.json`` (the folder's classes), ``vae.msgpack``,
``latent.json`` (the prompts: ``experiments.sample --workdir=W --prompt="..."`` needs no folder),
the run loop's checkpoints and metrics, then ``prompts/<caption>.png`` and ``samples.npz``
(``latent.samples_per_prompt`` samples of each caption, ``labels`` the class of each caption: the
class sub-folder of its images, or the caption's id without classes) when there are at most
:data:`MAX_SAMPLED_PROMPTS` captions. The same command resumes; a folder whose captions changed
is refused with one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from ddpm_jax import config as config_lib, folder_source, run_start, runs
from ddpm_jax.errors import UsageError
from ddpm_jax.latent import captions as captions_lib, pipeline, prompts as prompts_lib
from ddpm_jax.preemption import PreemptionGuard
from ddpm_jax.workdir import log, read_json
from experiments import latent_digits

MAX_SAMPLED_PROMPTS = 64  # more captions: no final per-caption samples (experiments.sample)


def text_recipe(c: ml_collections.ConfigDict, image_size: int, max_words: int) -> None:
    """Turns the folder config ``c`` into the latent text-conditioned recipe (in place)."""
    recipe = latent_digits.get_config()
    for section in ("model", "diffusion", "train", "sample"):
        c[section] = recipe[section]
    c.latent = recipe.latent
    factor = 2 ** int(math.log2(min(8, max(1, image_size // 8))))
    c.latent.image_size = image_size
    c.latent.vae_block_out_channels = (16, 32, 32, 32)[: int(math.log2(factor)) + 1]
    c.latent.text_max_length = max(config_lib.latent_config().text_max_length, max_words)
    c.model.attn_resolutions = (max(1, image_size // factor // 2),)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    prepare: Callable[..., folder_source.PreparedFolder],
    *,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
):
    """Checks the captions, prepares the folder (``prepare(config, workdir, record=False)``:
    ``experiments.folder``'s), records it once its captions are the run's, trains, then samples
    every caption. Returns the run loop's ``RunResult``, or None when preempted.

    Raises:
      UsageError: missing, empty or too long captions; ``data.crop="random"``; captions that
        differ from the ones ``workdir`` was trained on.
    """
    d = config.data
    if d.crop != "center":
        raise UsageError(
            f"data.crop={d.crop!r}: the text-conditioned recipe trains on centre crops (pass "
            "--config.data.crop=center, or --config.data.captions=False for the pixel recipe)"
        )
    listing, captions = captions_lib.folder_captions(d.dir)
    captions_lib.check_captions(listing, captions, config.latent.text_max_length)
    options = dict(start_over=start_over, allow_change=allow_change)
    with run_start.prepare(config, workdir, **options) as start, PreemptionGuard() as preemption:
        prepared = prepare(config, start.workdir, record=False)
        manifest = read_json(os.path.join(prepared.path, folder_source.MANIFEST))
        n = min(prepared.num_examples, d.num_examples or prepared.num_examples)
        examples = [prepared.source[i] for i in range(n)]
        labels = np.asarray([e["label"] for e in examples], np.int32)
        cp = captions_lib.caption_prompts(manifest["captions"][:n], labels)
        _check_same_prompts(start.workdir, cp.prompts)
        folder_source.write_run_info(start.workdir, prepared)
        images = np.stack([e["image"] for e in examples])
        log(f"data: {len(cp.prompts)} distinct captions of {len(images)} images are the prompts")
        result = pipeline.train_latent(
            config, start.workdir, images, cp.image_prompt, cp.prompts,
            np.arange(len(cp.prompts)), log=log, preemption=preemption,
            label_classes=cp.prompt_class, **options,
        )  # fmt: skip
        if result is None:
            return None
        path = os.path.join(start.workdir, "samples.npz")
        if result.status == "already_complete" and os.path.exists(path):
            log(f"already finished: prompt grids and samples in {start.workdir}")
            return result
        if len(cp.prompts) > MAX_SAMPLED_PROMPTS:
            log(f"{len(cp.prompts)} captions: sample them with experiments.sample --prompt")
            return result
        loaded = runs.load_run(start.workdir)
        per_prompt, stop = config.latent.samples_per_prompt, preemption.reached
        samples = prompts_lib.sample_prompts(loaded, [], per_prompt, config.seed, stop)
        if samples is None:
            log("preempted (SIGTERM) while sampling: nothing written; run the same command again")
            return None
    prompts_lib.write_prompt_outputs(start.workdir, cp.prompts, samples)
    log(f"wrote {start.workdir}/prompts/*.png and samples.npz ({len(cp.prompts)} captions)")
    return result


def _check_same_prompts(workdir: str, prompts: list[str]) -> None:
    """Refuses a folder whose captions differ from the ones ``workdir`` was trained on."""
    before = read_json(os.path.join(workdir, pipeline.LATENT_FILE))
    if before is not None and before["prompts"] != prompts:
        gone = sorted(set(before["prompts"]) - set(prompts))[:3]
        new = sorted(set(prompts) - set(before["prompts"]))[:3]
        raise UsageError(
            f"{workdir} was trained on {len(before['prompts'])} other captions (no longer: "
            f"{gone}; new: {new}): restore the folder's captions or use another --workdir"
        )


__all__ = ["MAX_SAMPLED_PROMPTS", "run", "text_recipe"]
