"""Samples from trained parameters: sharded rounds of images, and loading a run to sample from.

:class:`Generator` draws images from a model's parameters with one sampler (a numerical method of
``ddpm_jax.samplers``) and classifier-free guidance for conditional models, in rounds sharded over
every device, gathered on every process. :func:`load_run` loads a training run's work directory
(pixel or latent) from its saved config and newest checkpoint, without building a dataset, so a
CIFAR-10 run can be sampled and evaluated where CIFAR-10 is not prepared.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import builders, guidance, images, samplers, schedules
from ddpm_jax import config as config_lib
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.errors import UsageError
from ddpm_jax.latent import frozen_vae
from ddpm_jax.models.text import Tokenizer
from ddpm_jax.parallel import AXIS, DataParallel, compiler_options
from ddpm_jax.workdir import log, read_json


class Generator:
    """Images from a model's parameters, in rounds sharded over the mesh's batch axis.

    Sample ``i`` of a call draws all its noise from its own key ``fold_in(key, i)``, so it is a
    function of (key, i) alone: the same whatever the device count, the round size or the
    sharding.

    Args:
      model: the network (``model.apply(params, x_t, t, y=...)``); conditional when
        ``model.null_label`` is not None.
      schedule: the noise schedule it was trained with.
      dp: the devices to shard rounds over.
      image_shape: ``(H, W, C)`` of the model's inputs (latents for a latent model).
      method / num_steps / eta / clip_x0 / prediction: see ``ddpm_jax.samplers.sample``.
      guidance_scale: classifier-free guidance scale (conditional models).
      batch_size: samples per round, rounded up to a multiple of the device count.
      decode_fn: optional jittable map of sampled arrays to images in [-1, 1] (a VAE decoder).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: schedules.Schedule,
        dp: DataParallel,
        image_shape: Sequence[int],
        *,
        method: str,
        num_steps: int,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        clip_x0: float | None = None,
        prediction: str = "eps",
        batch_size: int = 256,
        decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    ):
        self.model, self.schedule, self.dp = model, schedule, dp
        self.image_shape = tuple(image_shape)
        self.method, self.num_steps, self.guidance_scale = method, num_steps, guidance_scale
        self.eta = eta if method == "ddim" else 0.0
        self.clip_x0, self.prediction, self.batch_size = clip_x0, prediction, batch_size
        self.decode_fn = decode_fn
        self.sharding = NamedSharding(dp.mesh, P(AXIS))
        self._fns: dict[int, Callable] = {}
        # fold_in(key, i) for a round's global sample indices i, sharded like the round.
        fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
        self._sample_keys = jax.jit(fold, out_shardings=self.sharding)

    def _fn(self, batch: int) -> Callable:
        if batch not in self._fns:
            shape, null_label = (batch, *self.image_shape), self.model.null_label

            def generate(params, keys, labels):
                model_fn = lambda x_t, t, **c: self.model.apply(params, x_t, t, **c)
                if null_label is not None:
                    guided = guidance.classifier_free(model_fn, self.guidance_scale, null_label)
                    model_fn = lambda x_t, t: guided(x_t, t, y=labels)
                x = samplers.sample(
                    model_fn,
                    self.schedule,
                    keys,
                    shape,
                    method=self.method,
                    num_steps=self.num_steps,
                    eta=self.eta,
                    prediction=self.prediction,
                    clip_x0=self.clip_x0 or None,
                )
                return x if self.decode_fn is None else self.decode_fn(x)

            self._fns[batch] = jax.jit(
                generate,
                out_shardings=self.sharding,
                compiler_options=compiler_options(self.dp.devices),
            )
        return self._fns[batch]

    def __call__(
        self,
        params: Any,
        key: jax.Array,
        num: int,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``num`` samples in rounds of ``batch_size`` rounded up to the device count.

        Args:
          params: the (replicated) model variables, e.g. the EMA parameters.
          key: sampling key; sample ``i`` uses ``fold_in(key, i)`` alone.
          num: number of samples.
          progress: optional ``progress(rounds_done, rounds)``, called after each round's
            images are on the host.
          should_stop: optional; when it returns True after a round, the call returns None
            (e.g. on a preemption notice).

        Returns:
          ``(images uint8 [num, H, W, C], labels int32 [num])`` on every process; labels cycle
          through ``0 .. null_label - 1`` (-1 for an unconditional model).
        """
        d = self.dp.num_devices
        batch = -(-min(self.batch_size, num) // d) * d
        rounds = -(-num // batch)
        if self.model.null_label is None:
            labels = np.full(rounds * batch, -1, np.int32)
        else:
            labels = (np.arange(rounds * batch) % self.model.null_label).astype(np.int32)
        out = []
        for r in range(rounds):
            chunk = labels[r * batch : (r + 1) * batch]
            y = jax.make_array_from_callback(chunk.shape, self.sharding, lambda i, c=chunk: c[i])
            keys = self._sample_keys(key, np.arange(r * batch, (r + 1) * batch, dtype=np.uint32))
            x = self._fn(batch)(params, keys, y)
            out.append(images.to_uint8(multihost_utils.process_allgather(x, tiled=True)))
            if progress is not None:
                progress(r + 1, rounds)
            if should_stop is not None and should_stop():
                return None
        return np.concatenate(out)[:num], labels[:num]


class ProgressLine:
    """``progress(done, total)`` printing ``label: batch r/R | n images | x images/s`` (process
    0; rewritten in place on a terminal)."""

    def __init__(self, label: str, num: int, enabled: bool = True):
        self.label, self.num, self.enabled = label, num, enabled
        self.start = time.time()
        self.tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        n = min(self.num, round(self.num * done / total))
        rate = n / max(time.time() - self.start, 1e-9)
        line = f"{self.label}: batch {done}/{total} | {n} images | {rate:.1f} images/s"
        log(("\r" if self.tty else "") + line, end="" if self.tty and done < total else "\n")


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class LoadedRun:
    """A trained run's pieces for sampling (see :func:`load_run`).

    Attributes:
      workdir: absolute work directory.
      config: the run's config (from ``config.json``).
      model: the network (a UNet, or a PromptUNet for a latent run).
      schedule: the noise schedule.
      dp: data parallelism over all devices.
      image_shape: ``(H, W, C)`` of the model's inputs (latents for a latent run).
      output_shape: ``(H, W, C)`` of the generated images (decoded, for a latent run).
      ema_params: the EMA parameters of the newest checkpoint, replicated over ``dp``'s mesh.
      step: that checkpoint's step.
      decode_fn: latents → images in [-1, 1] for a latent run, else None.
      label_classes: ``[null_label]`` int32, the dataset class each conditioning label stands
        for (a latent run's prompts name classes), or None when labels are the classes.
    """

    workdir: str
    config: ml_collections.ConfigDict
    model: nn.Module
    schedule: schedules.Schedule
    dp: DataParallel
    image_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    ema_params: Any
    step: int
    decode_fn: Callable[[jax.Array], jax.Array] | None = None
    label_classes: np.ndarray | None = None

    def generator(self, **sample_overrides: Any) -> Generator:
        """A :class:`Generator` with the run's ``config.sample`` settings, some overridden."""
        kwargs = builders.sample_settings(self.config)
        unknown = sorted(set(sample_overrides) - set(kwargs))
        if unknown:
            raise ValueError(f"{unknown} are not sample settings: {sorted(kwargs)}")
        kwargs.update(sample_overrides)
        return Generator(
            self.model,
            self.schedule,
            self.dp,
            self.image_shape,
            decode_fn=self.decode_fn,
            **kwargs,
        )

    def classes_of(self, labels: np.ndarray) -> np.ndarray:
        """The dataset classes of conditioning labels (-1 stays -1)."""
        labels = np.asarray(labels)
        if self.label_classes is None:
            return labels
        return np.where(labels >= 0, self.label_classes[np.maximum(labels, 0)], -1)


def load_run(workdir: str | os.PathLike) -> LoadedRun:
    """Loads a training run's config and the EMA parameters of its newest checkpoint.

    Nothing in ``workdir`` is changed. No dataset is built: the image shape and classes of a
    pixel run come from the dataset's metadata; a latent run's come from ``latent.json`` and its
    frozen autoencoder from ``vae.msgpack``.

    Raises:
      UsageError: no such run, no ``config.json``, an invalid config, or no checkpoint.
    """
    path = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(path, "config.json")
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise UsageError(f"workdir={path!r} does not exist; pass a training run's --workdir")
    saved = read_json(config_path)
    if saved is None:
        raise UsageError(f"workdir={path!r} has no readable config.json: it is not a training run")
    config = ml_collections.ConfigDict(saved)
    try:
        config_lib.validate(config)
    except UsageError as e:
        raise UsageError(f"{config_path}: {e}") from e
    decode_fn = label_classes = None
    if "latent" in config:
        info = read_json(os.path.join(path, "latent.json"))
        if info is None:
            raise UsageError(f"workdir={path!r} is a latent run without a readable latent.json")
        prompts = info["prompts"]
        tokenizer = Tokenizer.from_prompts(prompts, max_length=config.latent.text_max_length)
        model = builders.build_prompt_unet(config, tokenizer, prompts)
        vae, vae_params = frozen_vae.load_vae(config, path, info["image_shape"])
        decode_fn = frozen_vae.make_decode_fn(vae, vae_params, info["scale_factor"])
        image_shape, output_shape = tuple(info["latent_shape"]), tuple(info["image_shape"])
        label_classes = np.asarray(info["prompt_classes"], np.int32)
    else:
        image_shape, num_classes = builders.data_spec(config)
        output_shape = image_shape
        model = builders.build_model(config, num_classes)
    dp = builders.build_parallel(config)
    optimizer, _ = builders.build_optimizer(config)
    abstract = builders.abstract_state(
        builders.init_state_fn(config, model, optimizer, image_shape), dp
    )
    if not os.path.isdir(ckpt_dir):
        raise UsageError(f"workdir={path!r} has no checkpoint in {ckpt_dir}; train it first")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.train.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UsageError(f"workdir={path!r} has no complete checkpoint in {ckpt_dir}")
        state = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return LoadedRun(
        workdir=path,
        config=config,
        model=model,
        schedule=builders.build_schedule(config),
        dp=dp,
        image_shape=tuple(image_shape),
        output_shape=tuple(output_shape),
        ema_params=state.ema_params,
        step=int(step),
        decode_fn=decode_fn,
        label_classes=label_classes,
    )


__all__ = ["Generator", "LoadedRun", "ProgressLine", "load_run"]
