"""The config boundary: where a ConfigDict becomes the objects of a run.

Every other module takes explicit arguments; only this module and ``config.py`` read a
``ConfigDict``. What is built here, from a validated config:

- the network: :func:`build_model` (the UNet of ``config.model``), :func:`build_prompt_unet` and
  :func:`build_vae` (latent runs, ``config.latent``);
- the noise schedule (:func:`build_schedule`) and the sampling settings of ``config.sample`` and
  ``config.eval`` (:func:`sample_settings`);
- the data: :func:`data_spec` (image shape and classes from the dataset's metadata, without
  reading data) and :func:`build_dataset` (the deterministic batches; a folder of images is
  prepared first, :func:`prepare_folder`);
- the optimizer and its learning-rate schedule (:func:`build_optimizer`), the parallel layout
  (:func:`build_parallel`);
- the training state: :func:`init_state_fn`, :func:`abstract_state` (shapes, dtypes and the
  layout's shardings, from ``jax.eval_shape``: nothing is computed) and :func:`init_state` (the
  state computed directly in its shards);
- the compiled-per-call training step (:func:`build_train_step`), the same for
  ``experiments.cifar`` and ``experiments.benchmark``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import data, folder_source, parallel, schedules, state as state_lib
from ddpm_jax.errors import UsageError
from ddpm_jax.folder_images import Preprocessing
from ddpm_jax.formulation import DEFAULTS as FORMULATION_DEFAULTS, Formulation
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.layers import DTYPES
from ddpm_jax.models.text import PromptUNet, TextEncoder, Tokenizer, prompt_table
from ddpm_jax.models.unet import UNet
from ddpm_jax.parallel import Layout
from ddpm_jax.sample_settings import SampleSettings
from ddpm_jax.workdir import INIT_TAG, run_key

Config = ml_collections.ConfigDict


# ----------------------------------------------------------------------------- networks


def build_unet(config: Config, *, num_classes: int | None = None, context_dim=None) -> UNet:
    """The UNet of ``config.model`` with the given conditioning."""
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        num_classes=num_classes,
        context_dim=context_dim,
        num_heads=m.num_heads,
        num_groups=m.num_groups,
        resblock_conditioning=m.resblock_conditioning,
        dtype=DTYPES[m.dtype],
        kernels=m.kernels,
    )


def build_model(config: Config, num_classes: int | None) -> UNet:
    """The UNet of a pixel-space run: class-conditional on the dataset's ``num_classes`` when
    ``config.model.class_conditional`` (None: when the dataset has two classes or more)."""
    conditional = config.model.class_conditional
    if conditional is None:
        conditional = (num_classes or 0) > 1
    if conditional and (num_classes or 0) < 2:
        has = "no labels" if num_classes is None else "a single class"
        raise UsageError(f"config.model.class_conditional=True but {config.data.name!r} has {has}")
    return build_unet(config, num_classes=num_classes if conditional else None)


def build_prompt_unet(config: Config, tokenizer: Tokenizer, prompts: Sequence[str]) -> PromptUNet:
    """The prompt-conditioned UNet of a latent run (``config.model``, ``config.latent``)."""
    c = config.latent
    text = TextEncoder(
        vocab_size=tokenizer.vocab_size,
        max_length=c.text_max_length,
        width=c.text_width,
        depth=c.text_depth,
        num_heads=c.text_num_heads,
    )
    unet = build_unet(config, context_dim=c.text_width)
    return PromptUNet(unet=unet, text=text, prompt_tokens=prompt_table(tokenizer, prompts))


def build_vae(config: Config, channels: int) -> AutoencoderKL:
    """The autoencoder of ``config.latent`` for images with ``channels`` channels."""
    c = config.latent
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(c.vae_block_out_channels),
        layers_per_block=c.vae_layers_per_block,
        latent_channels=c.vae_latent_channels,
        norm_num_groups=c.vae_norm_num_groups,
    )


def build_schedule(config: Config) -> schedules.Schedule:
    """The noise schedule of ``config.diffusion``; a fine-tuning run's (``config.finetune``) is
    its pretrained folder's ``scheduler/scheduler_config.json``."""
    if "finetune" in config:
        # Imported here: the run loop loads no weights module otherwise.
        from ddpm_jax.weights import diffusers, stable_diffusion as sd

        path = os.path.join(config.finetune.pretrained, "scheduler", sd.SCHEDULER_CONFIG_NAME)
        return sd.scheduler_from_config(diffusers.read_config(path), source=path).schedule
    d = config.diffusion
    kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end) if d.schedule == "linear" else {}
    return schedules.get(d.schedule, d.num_timesteps, **kwargs)


def formulation(config: Config) -> Formulation:
    """The formulation of ``config.diffusion`` (``ddpm_jax.formulation``; a run's config from
    before these fields is DDPM). Not checked here: ``config.validate`` checks it."""
    d = config.diffusion
    values = {k: d.get(k, default) for k, default in FORMULATION_DEFAULTS.items()}
    return Formulation(kind=values.pop("formulation"), **values)


def sample_settings(config: Config, section: str = "sample") -> SampleSettings:
    """The sampling settings of ``config.sample``, or of ``config.eval`` (``section="eval"``:
    its ``method``, ``num_steps`` and ``guidance_scale`` over ``config.sample``'s). Not checked
    here: ``config.validate`` checks both, naming the config's fields."""
    s = config.sample
    settings = SampleSettings(
        method=s.method,
        num_steps=s.num_steps,
        eta=s.eta,
        guidance_scale=s.guidance_scale,
        clip_x0=s.clip_x0,
        variance=s.variance,
        batch_size=s.batch_size,
    )
    if section == "sample":
        return settings
    e = config[section]
    return settings.replace(method=e.method, num_steps=e.num_steps, guidance_scale=e.guidance_scale)


# ----------------------------------------------------------------------------- data


def check_image_shape(config: Config, image_shape: Sequence[int]) -> None:
    """Raises UsageError unless the UNet's levels can halve the image sides."""
    h, w = image_shape[:2]
    factor = 2 ** (len(config.model.ch_mult) - 1)
    if h % factor or w % factor:
        raise UsageError(
            f"config.model.ch_mult={tuple(config.model.ch_mult)} needs image sides divisible by "
            f"{factor}; the images are {h}x{w} (set config.data.image_size)"
        )


def data_spec(
    config: Config, workdir: str | None = None
) -> tuple[tuple[int, int, int], int | None]:
    """``(image_shape, num_classes)`` of a pixel-space run's data, from the dataset's metadata
    (no data is read or prepared); a folder run's from the run's ``folder.json`` in ``workdir``
    (else from the folder's prepared cache)."""
    d = config.data
    if d.name == folder_source.FOLDER:
        shape, num_classes = folder_source.folder_spec(
            d.dir,
            folder_preprocessing(config),
            cache_dir=d.cache_dir,
            run_info=folder_source.read_run_info(workdir),
        )
    else:
        shape, num_classes = data.image_spec(d.name, data_dir=d.data_dir, image_size=d.image_size)
    check_image_shape(config, shape)
    return shape, num_classes


def folder_preprocessing(config: Config) -> Preprocessing:
    """How the images of a folder dataset are prepared (``config.data``)."""
    d = config.data
    return Preprocessing(d.image_size, crop=d.crop, channels=d.channels, upscale=d.upscale)


def prepare_folder(config: Config) -> folder_source.PreparedFolder:
    """The prepared images of ``config.data.dir`` (prepared now unless cached)."""
    d = config.data
    return folder_source.prepare_folder(
        d.dir,
        folder_preprocessing(config),
        cache_dir=d.cache_dir,
        skip_unreadable=d.skip_unreadable,
    )


def build_dataset(
    config: Config, prepared: folder_source.PreparedFolder | None = None
) -> data.ImageDataset:
    """This process's deterministic training batches of ``config.data`` (a folder dataset from
    ``prepared``, or :func:`prepare_folder` when None)."""
    d = config.data
    if d.name == folder_source.FOLDER:
        prepared = prepare_folder(config) if prepared is None else prepared
        ds = data.ImageDataset(
            prepared.source,
            name=d.name,
            num_classes=prepared.num_classes,
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            random_flip=bool(d.random_flip),
            num_examples=d.num_examples,
            augment=prepared.augment,
        )
    else:
        ds = data.make_dataset(
            d.name,
            split="train",
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            data_dir=d.data_dir,
            manual_dir=d.manual_dir,
            random_flip=d.random_flip,
            image_size=d.image_size,
            num_examples=d.num_examples,
        )
    check_image_shape(config, ds.image_shape)
    return ds


# ----------------------------------------------------------------------------- training


def build_optimizer(config: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam of ``config.train`` with warm-up and clipping, and its learning-rate schedule."""
    t = config.train
    optimizer = state_lib.make_optimizer(
        t.lr, t.warmup_steps, t.grad_clip, b1=t.b1, b2=t.b2, eps=t.eps
    )
    return optimizer, state_lib.learning_rate_schedule(t.lr, t.warmup_steps)


def build_parallel(config: Config, *, fsdp_over_all_devices: bool = False) -> Layout:
    """The parallel layout ``config.parallel`` over every device of the job (``config.mesh``:
    the size of the FSDP axis and the smallest sharded leaf).

    Args:
      config: the config (one from before the ``mesh`` section gets its defaults).
      fsdp_over_all_devices: ignore ``config.mesh.fsdp`` and shard over all devices (loading a
        run on other devices than it was trained on).
    """
    m = config.get("mesh") or ml_collections.ConfigDict(dict(fsdp=None, fsdp_min_size=None))
    fsdp_size = None if fsdp_over_all_devices else m.fsdp
    min_size = parallel.fsdp.DEFAULT_MIN_SIZE if m.fsdp_min_size is None else m.fsdp_min_size
    return parallel.make(config.parallel, fsdp_size=fsdp_size, min_size=min_size)


def init_state_fn(
    config: Config,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    image_shape: Sequence[int],
) -> Callable[..., state_lib.TrainState]:
    """``init(variables=None) -> TrainState`` at step 0: parameters from
    ``run_key(seed, INIT_TAG)``, or the given ``variables`` (a fine-tuning run's pretrained
    ones, of the same structure)."""

    def init(variables: Any = None) -> state_lib.TrainState:
        if variables is None:
            x = jnp.zeros((1, *image_shape), jnp.float32)
            t = jnp.zeros((1,), jnp.int32)
            y = None if model.null_label is None else jnp.zeros((1,), jnp.int32)
            variables = model.init(run_key(config.seed, INIT_TAG), x, t, y=y)
        return state_lib.create_train_state(variables, optimizer)

    return init


def abstract_state(init: Callable[[], state_lib.TrainState], dp: Layout) -> Any:
    """The state's ``ShapeDtypeStruct`` tree with ``dp``'s shardings (``dp.state_shardings``:
    replicated, or sharded under FSDP); nothing is computed, and tracing the initialisation also
    checks the model against the image shape. Checkpoints are restored into it."""
    shapes = jax.eval_shape(init)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes,
        dp.state_shardings(shapes),
    )


def init_state(
    init: Callable[..., state_lib.TrainState], abstract: Any, variables: Any = None
) -> state_lib.TrainState:
    """The state at step 0 computed in the layout of ``abstract`` (:func:`abstract_state`): one
    ``jax.jit`` with those ``out_shardings``, so each device computes only its own shards and the
    whole state never exists on one device. ``variables``: start from these parameters (an
    argument of the compiled call, not a constant of it) instead of a fresh initialisation."""
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    if variables is not None:
        expected = jax.tree.map(lambda a: (a.shape, a.dtype), abstract.params)
        given = jax.tree.map(lambda a: (tuple(a.shape), a.dtype), variables)
        if expected != given:
            raise ValueError("init_state: the variables do not have the model's structure")
    return jax.jit(init, out_shardings=shardings)(variables)


def step_settings(config: Config) -> state_lib.StepSettings:
    """The training step's settings of ``config`` (seed, batch, ``diffusion`` loss, EMA, label
    dropout)."""
    d, t = config.diffusion, config.train
    return state_lib.StepSettings(
        seed=config.seed,
        global_batch_size=t.batch_size,
        prediction=d.prediction,
        weighting=d.weighting,
        min_snr_gamma=d.min_snr_gamma,
        ema_decay=t.ema_decay,
        p_uncond=t.p_uncond,
        formulation=formulation(config),
    )


def build_train_step(
    config: Config,
    model: nn.Module,
    schedule: schedules.Schedule,
    optimizer: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    dp: Layout,
) -> Callable:
    """The engine's training step: ``state.make_train_step`` of :func:`step_settings` (loss,
    Adam, EMA, per-example randomness), its gradients reduced by the layout (``dp.map_grads``),
    compiled by the layout and scanned over the steps of one call (``dp.wrap``).

    Returns:
      ``fn(state, batch) -> (state, metrics)`` (see ``dp.wrap``).
    """

    def apply_fn(params, x_t, t, y=None, rng=None, example_index=None):
        rngs = {"dropout": rng}
        return model.apply(params, x_t, t, y=y, train=True, example_index=example_index, rngs=rngs)

    step_fn = state_lib.make_train_step(
        apply_fn,
        schedule,
        optimizer,
        step_settings(config),
        map_grads=dp.map_grads,
        lr_schedule=lr_schedule,
        null_label=model.null_label,
    )
    return dp.wrap(step_fn)


__all__ = [
    "abstract_state",
    "build_dataset",
    "build_model",
    "build_optimizer",
    "build_parallel",
    "build_prompt_unet",
    "build_schedule",
    "build_train_step",
    "build_unet",
    "build_vae",
    "check_image_shape",
    "data_spec",
    "folder_preprocessing",
    "formulation",
    "init_state",
    "init_state_fn",
    "prepare_folder",
    "sample_settings",
    "step_settings",
]
