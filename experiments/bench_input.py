"""The benchmark's ``input`` section: does the input pipeline of a folder run keep up with its
training step? (issue #24)

It writes a synthetic folder (``--input-images`` RGB images of mixed sizes, 48-160 px per side,
smooth gradients with random rectangles so that they compress like photographs, PNG and JPEG
alternating, two class sub-folders) into a temporary directory and runs what
``experiments.folder`` runs on it at ``--input-size`` (64: the 64 px recipe, batch 128):

- ``prepare_s``: ``builders.prepare_folder`` preparing it (decode, crop, resize, write the cache,
  one thread per core) and ``cached_start_s`` the same call again (the cache is found and read);
- per augmentation (``recipe``: the recipe's settings, centre crop and no flips; ``random``:
  ``data.crop="random"`` and ``data.random_flip=True``): the dataset of ``builders.build_dataset``
  read through ``Dataset.iterator(0)`` (grain's prefetching worker threads, as training reads it):
  ``first_batch_s``, and ``batches_per_s`` and ``images_per_s`` over ``--input-batches`` batches
  timed from the iterator's creation (its start-up included); ``batch_images_per_s`` is the
  same through ``Dataset.batch(step)`` (random access, one thread);
- ``step``: the recipe's compiled training step (the real model: ``experiments.folder``'s
  ``get_config(size)`` with the folder's classes, ``builders.build_train_step``, random weights)
  at ``--input-step-batch`` images per step (a 128-image step takes minutes on a CPU; a CPU's
  images/s hardly depends on the batch), timed over ``--train-repeats`` steps after
  ``--train-warmup``: ``images_per_s``, ``step_s`` and its min / max;
- ``read_over_step``: the reading rows' ``images_per_s`` / the step's (how many times faster
  the pipeline delivers images than the step consumes them).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from ddpm_jax import builders
from ddpm_jax.errors import UsageError
from experiments import folder, measure

COLUMNS = (
    "what", "augment", "images", "image_size", "batch", "prepare_s", "cached_start_s",
    "first_batch_s", "batches_per_s", "images_per_s", "batch_images_per_s", "step_s",
    "step_s_min", "step_s_max", "compile_s", "read_over_step",
)  # fmt: skip


def add_arguments(p) -> None:
    """The section's flags on the benchmark's parser."""
    positive = measure.positive_int
    p.add_argument("--input-images", type=positive, default=1024, help="input: synthetic images")
    p.add_argument("--input-size", type=positive, default=64, help="input: data.image_size")
    p.add_argument("--input-batches", type=positive, default=40, help="input: batches read, timed")
    p.add_argument("--input-step-batch", type=positive, default=8, help="input: images per step")


def write_synthetic_folder(directory: str, count: int, seed: int = 0) -> None:
    """``count`` RGB images of mixed sizes in ``directory/a`` and ``directory/b``, PNG and JPEG
    alternating (see the module docstring)."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        os.makedirs(os.path.join(directory, name), exist_ok=True)
    for i in range(count):
        h, w = rng.integers(48, 161, 2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([yy, xx, 1 - yy], -1))
        for _ in range(4):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            dy, dx = rng.integers(8, h), rng.integers(8, w)
            base[y0 : y0 + dy, x0 : x0 + dx] = rng.uniform(0, 255, 3)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        ext = ".png" if i % 2 else ".jpg"
        image.save(os.path.join(directory, "ab"[i % 2], f"{i:05d}{ext}"))


def _read(ds, num_batches: int) -> dict:
    """Times reading ``num_batches`` batches through ``ds.iterator(0)`` from its creation (the
    start-up included: conservative, the prefetch buffer starts empty), and as many through
    ``ds.batch(step)``."""
    start = time.perf_counter()
    it = ds.iterator(0)
    first = next(it)
    first_s = time.perf_counter() - start
    for _ in range(num_batches - 1):
        batch = next(it)
    read_s = time.perf_counter() - start
    del it
    assert batch["image"].shape == first["image"].shape == (ds.local_batch_size, *ds.image_shape)
    start = time.perf_counter()
    for step in range(num_batches):
        ds.batch(step)
    random_s = time.perf_counter() - start
    b = ds.local_batch_size
    return dict(first_batch_s=first_s, batches_per_s=num_batches / read_s,
                images_per_s=num_batches * b / read_s,
                batch_images_per_s=num_batches * b / random_s)  # fmt: skip


def _step(config, ds, args) -> dict:
    """The recipe's compiled training step at ``--input-step-batch`` images, timed."""
    config = config.copy_and_resolve_references()
    config.train.batch_size, config.train.steps_per_call = args.input_step_batch, 1
    net = builders.build_model(config, ds.num_classes)
    dp = builders.build_parallel(config)
    optimizer, lr_schedule = builders.build_optimizer(config)
    init = builders.init_state_fn(config, net, optimizer, ds.image_shape)
    abstract = builders.abstract_state(init, dp)
    schedule = builders.build_schedule(config)
    s = measure.Setup(config, net, ds.image_shape, dp, schedule, optimizer, lr_schedule, abstract)
    fn = builders.build_train_step(config, net, schedule, optimizer, lr_schedule, dp)
    state, batch = measure.train_inputs(s)
    compiled, compile_s = measure.compile_timed(fn, state, batch)
    holder = [state]

    def call():
        holder[0], metrics = compiled(holder[0], batch)
        return metrics

    del state
    times = measure.time_calls(call, args.train_warmup, args.train_repeats)
    row = measure._timing(times, 1, args.input_step_batch, "step_s")
    params_m = sum(p.size for p in jax.tree.leaves(abstract.params)) / 1e6
    return dict(row, compile_s=compile_s, params_M=params_m, devices=dp.num_devices)


def bench_input(args) -> list[dict]:
    """The rows of the section (module docstring): preparation, reading per augmentation, the
    training step, and the ratio of reading to consuming."""
    size = args.input_size
    if args.input_step_batch % jax.device_count():
        raise UsageError(
            f"--input-step-batch={args.input_step_batch}: not divisible by the "
            f"{jax.device_count()} devices"
        )
    config = folder.get_config(size)
    common = dict(images=args.input_images, image_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        config.data.dir = os.path.join(tmp, "images")
        config.data.cache_dir = os.path.join(tmp, "cache")
        write_synthetic_folder(config.data.dir, args.input_images)
        start = time.perf_counter()
        prepared = builders.prepare_folder(config)
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = builders.prepare_folder(config)
        cached_start_s = time.perf_counter() - start
        assert not prepared.from_cache and cached.from_cache
        assert prepared.num_examples == args.input_images, prepared.num_examples
        rows = [dict(common, what="prepare", prepare_s=prepare_s, cached_start_s=cached_start_s)]
        for augment in ("recipe", "random"):
            c = config.copy_and_resolve_references()
            if augment == "random":
                c.data.crop, c.data.random_flip = "random", True
            ds = builders.build_dataset(c, builders.prepare_folder(c))
            rows.append(dict(common, what="read", augment=augment, batch=ds.local_batch_size,
                             **_read(ds, args.input_batches)))  # fmt: skip
        step = _step(config, ds, args)
    rows.append(dict(common, what="step", batch=args.input_step_batch, **step))
    for row in rows[1:-1]:
        row["read_over_step"] = row["images_per_s"] / step["images_per_s"]
    return rows


def summary(rows: list[dict]) -> dict:
    """The section's headline figures."""
    by = {(r["what"], r.get("augment")): r for r in rows}
    prep, read, step = by[("prepare", None)], by[("read", "recipe")], by[("step", None)]
    return dict(
        input_prepare_s=prep["prepare_s"], input_cached_start_s=prep["cached_start_s"],
        input_batches_per_s=read["batches_per_s"], input_images_per_s=read["images_per_s"],
        input_step_images_per_s=step["images_per_s"], input_read_over_step=read["read_over_step"],
        input_read_over_step_random=by[("read", "random")]["read_over_step"],
    )  # fmt: skip
