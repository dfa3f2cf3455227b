"""Train on your own images: a DDPM on a folder of image files, the recipe sized by resolution.

::

    python -m experiments.folder --workdir=runs/mine --config.data.dir=PATH \\
        --config.data.image_size=64

Sub-folders of ``PATH`` are classes (sorted names → labels; the model is class-conditional with
classifier-free guidance when there are two or more, ``model.class_conditional=None``); images
directly in ``PATH`` make an unconditional run. Every format Pillow reads; images are converted
to the run's channels (``data.channels``, None: gray when every image is), centre-cropped
(``data.crop="center"``, or ``"random"`` as augmentation) and resized with Lanczos. The first run
prepares the folder into a cache (``data.cache_dir``, default ``~/.cache/ddpm_jax/folders``) that
later runs read; a changed folder is prepared again. Unreadable files stop the run before training
(exit code 2, listed in ``WORKDIR/unreadable.json``) unless ``--config.data.skip_unreadable=True``.
The run records the folder's classes in ``WORKDIR/folder.json`` (sampling needs no folder; the
sample grids name each class). A folder where every image has a caption (``metadata.jsonl``, or a
``.txt`` beside each image) trains the latent text-conditioned recipe on the captions instead
(``data.captions``: None = so; True = captions required; False = ignored; see
``experiments/folder_captions.py``), sampled with ``experiments.sample --prompt``.

The recipe follows ``data.image_size`` (:data:`RECIPES`, the row of the largest size not above
it); every field can still be overridden with ``--config.*``:

======  =================================================================================
 size   recipe
======  =================================================================================
 <=16   CPU-sized (``experiments.digits`` taken to 16 px at twice its cost per step): ch 16,
        ch_mult (1, 2, 4), 1 block, no attention, cosine schedule, Adam 2e-3, batch 128, EMA
        0.995, 800 steps, label dropout 0.15; DPM-Solver++(2M) 20 steps, guidance 3
 32     Ho et al. (2020) CIFAR-10: ch 128, (1, 2, 2, 2), 2 blocks, attention at 16, dropout
        0.1, linear β, Adam 2e-4, batch 128, EMA 0.9999, 800k steps
 64     ch 128, (1, 2, 2, 2), 2 blocks, attention at 16, no dropout, Adam 1e-4, batch 128,
        500k steps
 128    ch 128, (1, 1, 2, 2, 4), 2 blocks, attention at 16, Adam 2e-5, batch 64, 500k steps
 256    Ho et al. (2020) LSUN / CelebA-HQ: ch 128, (1, 1, 2, 2, 4, 4), 2 blocks, attention at
        16, Adam 2e-5, batch 64, EMA 0.9999, 500k steps (CelebA-HQ)
======  =================================================================================

Above 16 px: linear β 1e-4 → 0.02 over T = 1000, ε-prediction, warm-up 5000 steps, clipping at 1,
random flips off (set ``data.random_flip=True`` for mirror-symmetric images). Running the same
command again resumes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from ddpm_jax import builders, cli, folder_source, run_start, train
from ddpm_jax.config import default_config
from ddpm_jax.errors import UsageError
from ddpm_jax.latent import captions
from ddpm_jax.workdir import log
from experiments import folder_captions

DEFAULT_IMAGE_SIZE = 64
_BIG = dict(num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, ch=128)
# size -> (model, train) overrides of default_config() (the DDPM CIFAR-10 recipe).
RECIPES = {
    16: (
        dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), num_groups=8),
        dict(num_steps=800, lr=2e-3, warmup_steps=50, ema_decay=0.995, p_uncond=0.15),
    ),
    32: ({}, {}),
    64: (dict(_BIG, ch_mult=(1, 2, 2, 2)), dict(lr=1e-4, num_steps=500_000)),
    128: (dict(_BIG, ch_mult=(1, 1, 2, 2, 4)), dict(lr=2e-5, batch_size=64, num_steps=500_000)),
    256: (dict(_BIG, ch_mult=(1, 1, 2, 2, 4, 4)), dict(lr=2e-5, batch_size=64, num_steps=500_000)),
}


def recipe_size(image_size: int) -> int:
    """The :data:`RECIPES` row of ``image_size``: the largest size not above it (16 below)."""
    return max([s for s in RECIPES if s <= image_size] or [min(RECIPES)])


def get_config(
    image_size: int = DEFAULT_IMAGE_SIZE, text: bool = False, max_words: int = 0
) -> ml_collections.ConfigDict:
    """The folder configuration for images of ``image_size`` pixels (see the module docstring);
    ``text``: the latent text-conditioned recipe, for captions of up to ``max_words`` words."""
    c = default_config()
    c.data.name = folder_source.FOLDER
    c.data.image_size = image_size
    c.data.random_flip = False
    c.model.class_conditional = config_dict.placeholder(bool)  # None: when there are classes
    size = recipe_size(image_size)
    model, training = RECIPES[size]
    c.model.update(model)
    c.train.update(training)
    c.train.steps_per_call = 10
    if text:
        folder_captions.text_recipe(c, image_size, max_words)
        return c
    if size > 16:
        return c
    c.diffusion.schedule = "cosine"
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.train.sample_every = 200
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.guidance_scale = 3.0
    c.sample.grid_size = 10  # column j shows class j (labels cycle)
    c.sample.batch_size = 100
    return c


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
    step_callback=None,
) -> train.RunResult:
    """Prepares the folder (or reads its cache), records it in ``workdir`` and trains; all of
    it after the run's preparation (``run_start.prepare``: config, lock, resume).

    Raises:
      UsageError: see ``ddpm_jax.folder_source.prepare_folder``; unreadable files are listed in
        ``workdir/unreadable.json`` first.
    """
    options = dict(start_over=start_over, allow_change=allow_change)
    if config.data.name != folder_source.FOLDER:
        return train.run(config, workdir, step_callback=step_callback, **options)
    if "latent" in config:
        return folder_captions.run(config, workdir, _prepared_folder, **options)
    if config.data.captions:
        raise UsageError("data.captions=True needs the text recipe: get_config(text=True)")
    with run_start.prepare(config, workdir, **options) as start:
        prepared = _prepared_folder(config, start.workdir)
        if 0 < prepared.num_captions < prepared.num_examples:
            log(
                f"data: {prepared.num_captions} of {prepared.num_examples} images have a caption:"
                " ignored (--config.data.captions=True requires one for every image)"
            )
        ds = builders.build_dataset(config, prepared)
        model = builders.build_model(config, ds.num_classes)
        return train.train(config, start, ds, model, step_callback=step_callback)


def _prepared_folder(config: ml_collections.ConfigDict, workdir: str, *, record: bool = True):
    """The prepared folder, recorded in ``workdir`` (the list of unreadable files, and with
    ``record`` ``folder.json``: ``folder_source.write_run_info``)."""
    try:
        prepared = builders.prepare_folder(config)
    except folder_source.UnreadableImagesError as e:
        path = folder_source.write_report(workdir, e.unreadable, skipped=False)
        raise UsageError(f"{e} (the list: {path})") from None
    how = "read from the cache" if prepared.from_cache else "prepared"
    names = ", ".join(prepared.classes[:10]) + (", ..." if len(prepared.classes) > 10 else "")
    classes = f"{len(prepared.classes)} classes ({names})" if prepared.classes else "no classes"
    log(
        f"data: {prepared.num_examples} images of {prepared.root}, {classes}, "
        f"{prepared.image_shape} ({how}: {prepared.path})"
    )
    if prepared.unreadable:
        path = folder_source.write_report(workdir, prepared.unreadable, skipped=True)
        log(f"data: {len(prepared.unreadable)} unreadable file(s) skipped, listed in {path}")
    before = folder_source.read_run_info(workdir)
    if before and (before["classes"], before["image_shape"]) != (
        list(prepared.classes),
        list(prepared.image_shape),
    ):
        raise UsageError(
            f"{workdir} was trained on classes {before['classes']} of shape "
            f"{before['image_shape']}; data.dir now gives {list(prepared.classes)} of shape "
            f"{list(prepared.image_shape)}: restore the folder or use another --workdir"
        )
    if record:
        folder_source.write_run_info(workdir, prepared)
    return prepared


def _flag(argv: Sequence[str], field: str) -> str | None:
    """The value of ``--config.<field>`` on the command line (the last one), else None."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == f"--config.{field}":
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return found


def recipe_of(argv: Sequence[str]) -> dict:
    """``get_config``'s arguments for a command line: its ``data.image_size`` (the recipe's row;
    else the default) and whether its ``data.dir`` trains on captions (``data.captions``)."""
    size = (_flag(argv, "data.image_size") or "").strip()
    size = int(size) if size.isdigit() and int(size) > 0 else DEFAULT_IMAGE_SIZE
    directory, wanted = _flag(argv, "data.dir"), (_flag(argv, "data.captions") or "none").lower()
    wanted = wanted.strip()
    text = directory is not None and (
        wanted in ("true", "1") or (wanted == "none" and captions.all_captioned(directory))
    )
    max_words = captions.longest_caption(directory) if text else 0
    return dict(image_size=size, text=text, max_words=max_words)


def main(argv: Sequence[str] | None = None):
    """``cli.main`` with the recipe of the command line's image size and captions."""
    argv = list(sys.argv if argv is None else argv)
    return cli.main(lambda: get_config(**recipe_of(argv)), argv, run_fn=run)


if __name__ == "__main__":
    main()
