"""Trained models to sample from: a training run's work directory, or published diffusers weights.

:func:`load_run` loads a run (pixel or latent) from its saved config and newest checkpoint without
building a dataset, so a CIFAR-10 run can be sampled and evaluated where CIFAR-10 is not prepared.
:func:`load_pretrained` loads a diffusers DDPM folder (``google/ddpm-cifar10-32`` and the like,
see ``ddpm_jax.weights.load_diffusers_pipeline``). Both give a :class:`LoadedRun`, whose
:meth:`~LoadedRun.generator` draws samples sharded over every device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ddpm_jax import builders, config as config_lib, folder_source, schedules
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.errors import UsageError
from ddpm_jax.formulation import DDPM, Formulation
from ddpm_jax.generate import Generator
from ddpm_jax.latent import frozen_vae
from ddpm_jax.models.text import Tokenizer
from ddpm_jax.parallel import DataParallel, Layout
from ddpm_jax.sample_settings import SampleSettings
from ddpm_jax.weights import load_diffusers_pipeline
from ddpm_jax.workdir import read_json


class DataRef(NamedTuple):
    """The dataset a model was trained on (reference statistics for FID come from it)."""

    name: str
    data_dir: str | None = None
    manual_dir: str | None = None


@dataclasses.dataclass
class LoadedRun:
    """A trained model's pieces for sampling (see :func:`load_run`, :func:`load_pretrained`).

    Attributes:
      path: the run's work directory, or the pretrained folder (absolute).
      model: the network (a UNet, or a PromptUNet for a latent run).
      schedule: the noise schedule.
      dp: the parallel layout over all devices (a run's ``config.parallel``; an FSDP run's over
        all devices of this job, whatever its ``mesh.fsdp`` was).
      image_shape: ``(H, W, C)`` of the model's inputs (latents for a latent run).
      output_shape: ``(H, W, C)`` of the generated images (decoded, for a latent run).
      ema_params: the variables to sample with (a run's EMA parameters), replicated over ``dp``.
      step: the checkpoint's step (0 for published weights).
      sample_settings: the sampling settings (a run's ``config.sample``; DDIM with 50 steps for
        published weights), varied with ``replace``.
      prediction: what the model predicts (``"eps"``, ``"x0"`` or ``"v"``).
      formulation: what the model was trained for (``ddpm_jax.formulation``; DDPM by default).
      data: the training dataset, when known.
      config: a run's config (None for published weights).
      decode_fn: latents → images in [-1, 1] for a latent run, else None.
      tokenizer: a latent run's prompt tokenizer, else None.
      label_classes: ``[null_label]`` int32, the dataset class each conditioning label stands
        for (a latent run's prompts name classes), or None when labels are the classes.
    """

    path: str
    model: nn.Module
    schedule: schedules.Schedule
    dp: Layout
    image_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    ema_params: Any
    step: int
    sample_settings: SampleSettings
    prediction: str
    data: DataRef | None = None
    config: ml_collections.ConfigDict | None = None
    decode_fn: Callable[[jax.Array], jax.Array] | None = None
    tokenizer: Tokenizer | None = None
    label_classes: np.ndarray | None = None
    formulation: Formulation = DDPM

    def generator(self, settings: SampleSettings | None = None) -> Generator:
        """A :class:`~ddpm_jax.generate.Generator` of this model with ``settings`` (default:
        :attr:`sample_settings`; e.g. ``run.sample_settings.replace(num_steps=20)``).

        Raises:
          UsageError: the settings are invalid for this model's schedule.
        """
        return Generator(
            self.model,
            self.schedule,
            self.dp,
            self.image_shape,
            self.sample_settings if settings is None else settings,
            prediction=self.prediction,
            formulation=self.formulation,
            decode_fn=self.decode_fn,
        )

    def classes_of(self, labels: np.ndarray) -> np.ndarray:
        """The dataset classes of conditioning labels (-1 stays -1)."""
        labels = np.asarray(labels)
        if self.label_classes is None:
            return labels
        return np.where(labels >= 0, self.label_classes[np.maximum(labels, 0)], -1)


def load_run(workdir: str | os.PathLike) -> LoadedRun:
    """Loads a training run's config and the EMA parameters of its newest checkpoint.

    Nothing in ``workdir`` is changed, and the run may be training meanwhile: the newest complete
    checkpoint is read (a damaged one is skipped with a warning and left in place). No dataset
    is built: the image shape and classes of a pixel run come from the dataset's metadata; a
    latent run's come from ``latent.json`` and its frozen autoencoder from ``vae.msgpack``.

    Raises:
      UsageError: no such run, no ``config.json``, an invalid config, no readable checkpoint, or
        permission denied.
      CheckpointFault: reading the newest checkpoint failed in another way than damaged files
        (an I/O error, device out of memory).
    """
    path = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(path, "config.json")
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
    decode_fn = label_classes = tokenizer = None
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
        image_shape, num_classes = builders.data_spec(config, workdir=path)
        output_shape = image_shape
        model = builders.build_model(config, num_classes)
    dp, ema_params, step = restore_ema(path, config, model, image_shape)
    d = config.data
    data_dir = d.data_dir  # a folder run's images for evaluation: its prepared cache
    if d.name == folder_source.FOLDER:
        data_dir = (folder_source.read_run_info(path) or {}).get("cache")
    return LoadedRun(
        path=path,
        model=model,
        schedule=builders.build_schedule(config),
        dp=dp,
        image_shape=tuple(image_shape),
        output_shape=tuple(output_shape),
        ema_params=ema_params,
        step=step,
        sample_settings=builders.sample_settings(config),
        prediction=config.diffusion.prediction,
        data=DataRef(d.name, data_dir, d.manual_dir),
        config=config,
        decode_fn=decode_fn,
        tokenizer=tokenizer,
        label_classes=label_classes,
        formulation=builders.formulation(config),
    )


def restore_ema(
    path: str, config: ml_collections.ConfigDict, model: Any, image_shape
) -> tuple[Layout, Any, int]:
    """``(dp, ema_params, step)`` of the newest complete checkpoint of the run in ``path``, its
    EMA parameters replicated over ``dp`` (the run's layout over all devices of this job; an FSDP
    run is restored sharded, then only its EMA is gathered). Reads only.

    Raises:
      UsageError: no checkpoint folder or no complete checkpoint.
    """
    ckpt_dir = os.path.join(path, "checkpoints")
    dp = builders.build_parallel(config, fsdp_over_all_devices=True)
    optimizer, _ = builders.build_optimizer(config)
    abstract = builders.abstract_state(
        builders.init_state_fn(config, model, optimizer, image_shape), dp
    )
    if not os.path.isdir(ckpt_dir):
        raise UsageError(f"workdir={path!r} has no checkpoint in {ckpt_dir}; train it first")
    # Read-only: the run may be training (an Orbax temporary directory is a save in progress).
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        state, step = ckpt.restore_latest(abstract)
        if step is None:
            raise UsageError(f"workdir={path!r} has no complete checkpoint in {ckpt_dir}")
    finally:
        ckpt.close()
    return dp, dp.gather(state.ema_params), int(step)


def load_pretrained(
    directory: str | os.PathLike, *, data: DataRef | None = None, parallel: str = "shard_map"
) -> LoadedRun:
    """Loads a diffusers DDPM pipeline folder (flat or pipeline layout) for sampling.

    Args:
      directory: the folder (``config.json`` + weights + ``scheduler_config.json``, or
        ``model_index.json`` with ``unet/`` and ``scheduler/``).
      data: the dataset it was trained on, for evaluation (e.g. ``DataRef("cifar10")``).
      parallel: ``"shard_map"`` or ``"pmap"``.

    Raises:
      UsageError: a missing or damaged file, or a configuration this library does not
        implement (one line naming it).
    """
    path = os.path.abspath(os.fspath(directory))
    pipe = load_diffusers_pipeline(path)
    if pipe.image_shape is None:
        raise UsageError(f"{path}: its config.json has no sample_size; the image size is unknown")
    dp = DataParallel(parallel)
    variables = jax.device_put(pipe.variables, dp.replicated)
    settings = SampleSettings("ddim", 50, clip_x0=pipe.clip_x0, variance=pipe.variance)
    return LoadedRun(
        path=path,
        model=pipe.model,
        schedule=pipe.schedule,
        dp=dp,
        image_shape=tuple(pipe.image_shape),
        output_shape=tuple(pipe.image_shape),
        ema_params=variables,
        step=0,
        sample_settings=settings,
        prediction=pipe.prediction,
        data=data,
    )


def load(
    workdir: str | None = None, pretrained: str | None = None, *, data: DataRef | None = None
) -> LoadedRun:
    """:func:`load_run` of ``workdir`` or :func:`load_pretrained` of ``pretrained`` (exactly one,
    the ``--workdir RUN | --pretrained DIR`` of the sampling and evaluation commands).

    Raises:
      UsageError: neither or both given, or loading fails.
    """
    if (workdir is None) == (pretrained is None):
        raise UsageError("pass exactly one of --workdir=RUN (a training run) or --pretrained=DIR")
    return load_run(workdir) if pretrained is None else load_pretrained(pretrained, data=data)


__all__ = ["DataRef", "LoadedRun", "load", "load_pretrained", "load_run", "restore_ema"]
