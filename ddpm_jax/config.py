"""The training configuration: ``default_config()`` and its validation.

Experiments extend :func:`default_config` in their ``get_config()``; :func:`validate` checks every
field the run loop reads and raises a :class:`~ddpm_jax.errors.UsageError` naming the field, the
value and what is allowed, before anything is compiled. The allowed values come from the modules
that implement them (``schedules.NAMES``, ``samplers.METHODS``, ...). Sections and fields (the
defaults are Ho et al. 2020, CIFAR-10):

- ``seed``: root of all randomness (init, data order, timesteps, noise, label dropout, samples).
- ``parallel``: ``"shard_map"`` (``jax.jit`` of ``jax.shard_map``, replicated state), ``"pmap"``
  or ``"fsdp"`` (state sharded over a 2-D mesh, ``ddpm_jax.parallel``); may change on resume.
- ``mesh`` (fsdp only): ``fsdp``, the size of the ``"fsdp"`` mesh axis (None: all devices; it
  must divide the device count), ``fsdp_min_size`` (smaller leaves stay replicated).
- ``data``: ``name``, ``data_dir``, ``manual_dir``, ``random_flip`` (None: dataset default),
  ``image_size`` (None: native), ``num_examples`` (None: all) — see ``ddpm_jax.data``. A folder of
  images (``name="folder"``, ``ddpm_jax.folder_source``): ``dir`` (the folder), ``cache_dir``
  (its prepared images; None: ``~/.cache/ddpm_jax/folders``), ``crop`` ("center" | "random"),
  ``channels`` (None: 1 when every image is gray, else 3), ``upscale`` (enlarge images smaller
  than ``image_size``), ``skip_unreadable`` (train without unreadable files, listed in the run),
  ``captions`` (None: train on them when every image has one; ``experiments.folder``).
- ``model``: the UNet's ``ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_heads,
  num_groups, resblock_conditioning``, ``dtype`` ("float32" | "bfloat16"), ``kernels`` ("auto":
  the CPU-tuned kernels on CPU, plain XLA elsewhere; "xla"; "cpu") and
  ``class_conditional`` (labels from the dataset, null label = ``num_classes``; None: when the
  dataset has two classes or more).
- ``diffusion``: ``formulation`` ("ddpm" | "edm" | "flow") and its fields ``sigma_data, p_mean,
  p_std, sigma_min, sigma_max, rho, t_distribution, shift`` (``ddpm_jax.formulation``); DDPM's
  ``schedule`` ("linear" | "cosine" | "sigmoid"), ``num_timesteps``, ``beta_start``, ``beta_end``
  (linear only), ``prediction`` ("eps" | "x0" | "v"), ``weighting`` ("uniform" | "min_snr"),
  ``min_snr_gamma``.
- ``train``: ``num_steps``, ``batch_size`` (global, over all devices of all processes), Adam's
  ``lr, b1, b2, eps``, ``warmup_steps`` (linear), ``grad_clip`` (global norm; 0 disables),
  ``ema_decay``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``sample_every``
  (0 disables the PNG grids), ``p_uncond`` (label dropout of class-conditional models),
  ``steps_per_call`` (training steps scanned inside one compiled call).
- ``sample``: the final ``samples.npz`` and the training grids: ``num_samples`` (0 disables),
  ``method``, ``num_steps``, ``guidance_scale``, ``eta`` (DDIM only), ``clip_x0`` (clip x̂_0 to
  [-clip_x0, clip_x0]; None: no clipping), ``variance`` (DDPM's "fixed_small" β̃ or
  "fixed_large" β), ``grid_size`` (a ``grid_size``² grid; 0 disables), ``batch_size`` (samples
  per compiled call, rounded up to a multiple of the device count).
- ``eval``: evaluation during training on the EMA parameters, every ``every`` steps (0: off):
  ``num_samples`` sampled with ``method``, ``num_steps``, ``guidance_scale``, scored against the
  training split's cached reference statistics (digits: digits-FID/KID and class accuracy; other
  datasets: the FID Inception, ``inception_path`` for offline machines; ``cache_dir`` of the
  statistics).
- ``latent`` (latent-diffusion experiments only, :func:`latent_config`): the autoencoder, its
  training and the text encoder; see :func:`latent_config`.
- ``finetune`` (Stable Diffusion fine-tuning only): see ``ddpm_jax.config_finetune``.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from ddpm_jax import (
    builders,
    config_finetune,
    diffusion,
    folder_images,
    folder_source,
    formulation,
    losses,
    parallel,
    schedules,
)
from ddpm_jax.config_fields import (
    boolean as _bool,
    choice as _choice,
    fail as _fail,
    get as _get,
    int_tuple as _int_tuple,
    integer as _int,
    number as _float,
    path as _path,
)
from ddpm_jax.errors import UsageError
from ddpm_jax.models import layers, ops
from ddpm_jax.models.unet import CIFAR10_DDPM


def default_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 configuration of Ho et al. (2020); experiments override fields.

    Returns:
      A ``ConfigDict`` with the sections described in the module docstring. Fields that may be
      None are ``placeholder``s, so ``--config.data.image_size=32`` style overrides work.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.parallel = "shard_map"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = config_dict.placeholder(int)  # None: all devices
    c.mesh.fsdp_min_size = parallel.fsdp.DEFAULT_MIN_SIZE

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.manual_dir = config_dict.placeholder(str)
    c.data.random_flip = config_dict.placeholder(bool)
    c.data.image_size = config_dict.placeholder(int)
    c.data.num_examples = config_dict.placeholder(int)
    c.data.dir = config_dict.placeholder(str)  # name="folder": the folder of images
    c.data.cache_dir = config_dict.placeholder(str)
    c.data.crop = "center"
    c.data.channels = config_dict.placeholder(int)
    c.data.upscale = True
    c.data.skip_unreadable = False
    c.data.captions = config_dict.placeholder(bool)  # None: when every image has a caption

    c.model = ml_collections.ConfigDict(dict(CIFAR10_DDPM))  # ch, ch_mult, blocks, attn, dropout
    c.model.num_heads = 1
    c.model.num_groups = 32
    c.model.resblock_conditioning = "additive"
    c.model.dtype = "float32"
    c.model.kernels = "auto"  # "xla" | "cpu" | "auto": the tuned CPU kernels on CPU only
    c.model.class_conditional = False

    c.diffusion = ml_collections.ConfigDict(dict(formulation.DEFAULTS))  # "ddpm": Ho et al.
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction = "eps"
    c.diffusion.weighting = "uniform"
    c.diffusion.min_snr_gamma = 5.0

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 800_000
    c.train.batch_size = 128
    c.train.lr = 2e-4
    c.train.warmup_steps = 5000
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 10_000
    c.train.p_uncond = 0.1
    c.train.steps_per_call = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 1000
    c.sample.method = "ddim"
    c.sample.num_steps = 100
    c.sample.guidance_scale = 1.0
    c.sample.eta = 0.0
    c.sample.clip_x0 = config_dict.FieldReference(1.0, field_type=float)  # None: no clipping
    c.sample.variance = "fixed_small"  # of the "ddpm" method: β̃ or β
    c.sample.grid_size = 8
    c.sample.batch_size = 256

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # 0: off
    c.eval.num_samples = 1000
    c.eval.method = "ddim"
    c.eval.num_steps = 50
    c.eval.guidance_scale = 1.0
    c.eval.inception_path = config_dict.placeholder(str)
    c.eval.cache_dir = config_dict.placeholder(str)
    return c


def latent_config() -> ml_collections.ConfigDict:
    """Defaults of the ``config.latent`` section of the latent-diffusion experiments.

    Fields: ``image_size`` (images are resized to it before encoding); the autoencoder's
    ``vae_block_out_channels, vae_layers_per_block, vae_norm_num_groups, vae_latent_channels``
    and its training ``vae_steps, vae_batch_size, vae_lr, vae_kl_weight``; the text encoder's
    ``text_width, text_depth, text_num_heads, text_max_length``; ``samples_per_prompt`` (final
    samples per prompt, in place of ``sample.num_samples``, which must be 0).
    """
    c = ml_collections.ConfigDict()
    c.image_size = 32
    c.vae_block_out_channels = (16, 32, 32)
    c.vae_layers_per_block = 1
    c.vae_norm_num_groups = 8
    c.vae_latent_channels = 4
    c.vae_steps = 300
    c.vae_batch_size = 64
    c.vae_lr = 1e-3
    c.vae_kl_weight = 1e-6
    c.text_width = 64
    c.text_depth = 2
    c.text_num_heads = 4
    c.text_max_length = 6
    c.samples_per_prompt = 25
    return c


def _check_known_keys(config) -> None:
    """Rejects unknown keys inside the known sections (typos); extra sections are allowed."""
    default = default_config()
    for section in ("mesh", "data", "model", "diffusion", "train", "sample", "eval"):
        if section not in config:
            if section in ("mesh", "eval"):  # runs from before these sections
                continue
            raise UsageError(f"config.{section} is missing; build configs from default_config()")
        unknown = sorted(set(config[section].keys()) - set(default[section].keys()))
        if unknown:
            raise UsageError(
                f"config.{section} has unknown field(s) {unknown}; allowed: "
                f"{sorted(default[section].keys())}"
            )


def validate(
    config: ml_collections.ConfigDict,
    *,
    device_count: int | None = None,
    process_count: int | None = None,
) -> None:
    """Checks every field the run loop reads; raises on the first invalid one.

    Args:
      config: a ConfigDict built from :func:`default_config`.
      device_count: number of devices of the job (all processes); when given,
        ``train.batch_size`` and ``mesh.fsdp`` are checked against it.
      process_count: number of processes; when given, ``train.batch_size`` must divide evenly.

    Raises:
      UsageError: naming the field, its value and what is allowed.
    """
    _check_known_keys(config)
    config_finetune.validate(config)  # first: --pretrained sets the rest
    _int(config, "seed", 0)
    _choice(config, "parallel", parallel.KINDS)
    if "mesh" in config:
        _int(config, "mesh.fsdp", 1, optional=True)
        _int(config, "mesh.fsdp_min_size", 0)
        if config.parallel == parallel.fsdp.KIND and device_count and config.mesh.fsdp:
            _divides("mesh.fsdp", config.mesh.fsdp, "the device count", device_count)

    name = _get(config, "data.name")
    if not isinstance(name, str) or not name:
        _fail("data.name", name, "expected a dataset name such as 'cifar10' or 'digits'")
    for field in ("data.data_dir", "data.manual_dir"):
        _path(config, field)
    _bool(config, "data.random_flip", optional=True)
    _int(config, "data.image_size", 1, optional=True)
    _int(config, "data.num_examples", 1, optional=True)
    _validate_folder(config)

    _int(config, "model.ch", 1)
    _int_tuple(config, "model.ch_mult", allow_empty=False)
    _int(config, "model.num_res_blocks", 1)
    _int_tuple(config, "model.attn_resolutions", allow_empty=True)
    _float(config, "model.dropout", 0.0, 1.0, hi_open=True)
    _int(config, "model.num_heads", 1)
    _int(config, "model.num_groups", 1)
    _choice(config, "model.resblock_conditioning", layers.RESBLOCK_CONDITIONINGS)
    _choice(config, "model.dtype", tuple(layers.DTYPES))
    _choice(config, "model.kernels", ops.KERNELS)
    _bool(config, "model.class_conditional", optional=True)
    m = config.model
    widths = sorted({m.ch, *(m.ch * k for k in m.ch_mult)})
    if any(w % m.num_groups for w in widths):
        _fail("model.num_groups", m.num_groups, f"must divide every channel count {widths}")
    if any(m.ch * k % m.num_heads for k in m.ch_mult):  # attention may run at every level
        levels = sorted({m.ch * k for k in m.ch_mult})
        _fail("model.num_heads", m.num_heads, f"must divide every level's channel count {levels}")

    _choice(config, "diffusion.schedule", schedules.NAMES)
    _int(config, "diffusion.num_timesteps", 1)
    if config.diffusion.schedule == "linear":
        _float(config, "diffusion.beta_start", 0.0, 1.0, lo_open=True, hi_open=True)
        _float(config, "diffusion.beta_end", 0.0, 1.0, lo_open=True, hi_open=True)
        if not config.diffusion.beta_start <= config.diffusion.beta_end:
            _fail(
                "diffusion.beta_start",
                config.diffusion.beta_start,
                f"must be <= diffusion.beta_end={config.diffusion.beta_end}",
            )
    _choice(config, "diffusion.prediction", diffusion.PREDICTIONS)
    _choice(config, "diffusion.weighting", losses.WEIGHTINGS)
    _float(config, "diffusion.min_snr_gamma", 0.0, float("inf"), lo_open=True)

    _int(config, "train.num_steps", 1)
    _int(config, "train.batch_size", 1)
    _float(config, "train.lr", 0.0, float("inf"), lo_open=True)
    _int(config, "train.warmup_steps", 0)
    _float(config, "train.grad_clip", 0.0, float("inf"))
    _float(config, "train.ema_decay", 0.0, 1.0)
    _float(config, "train.b1", 0.0, 1.0, hi_open=True)
    _float(config, "train.b2", 0.0, 1.0, hi_open=True)
    _float(config, "train.eps", 0.0, float("inf"), lo_open=True)
    _int(config, "train.log_every", 1)
    _int(config, "train.checkpoint_every", 1)
    _int(config, "train.keep_checkpoints", 1)
    _int(config, "train.sample_every", 0)
    _float(config, "train.p_uncond", 0.0, 1.0, hi_open=True)
    _int(config, "train.steps_per_call", 1)

    _int(config, "sample.num_samples", 0)
    _int(config, "sample.grid_size", 0)
    for section in ("sample", "eval"):  # present, so that the settings can be built
        for field in default_config()[section].keys() if section in config else ():
            _get(config, f"{section}.{field}")
    T, methods = config.diffusion.num_timesteps, builders.formulation(config).check().methods
    builders.sample_settings(config).check(T, prefix="config.sample.", methods=methods)
    if "eval" in config:
        _int(config, "eval.every", 0)
        _int(config, "eval.num_samples", 2)
        for field in ("eval.inception_path", "eval.cache_dir"):
            _path(config, field)
        # The fields eval sets over sample's; T bounds its steps only when it evaluates.
        settings = builders.sample_settings(config, "eval")
        settings.check(T if config.eval.every else None, prefix="config.eval.", methods=methods)
    if "latent" in config:
        _validate_latent(config)

    batch = config.train.batch_size
    if device_count is not None and batch % device_count:
        _fail(
            "train.batch_size",
            batch,
            f"the global batch must be divisible by the device count {device_count} "
            f"(e.g. {max(device_count, batch // device_count * device_count)})",
        )
    if process_count is not None and batch % process_count:
        _fail("train.batch_size", batch, f"must be divisible by process count {process_count}")


def check_paths(config: ml_collections.ConfigDict) -> None:
    """Checks the files and folders a training run will read, before anything is compiled:
    ``data.data_dir`` and ``data.manual_dir`` are directories, ``eval.inception_path`` a readable
    file (when given). :func:`validate` checks only values: a saved run's config stays valid for
    sampling on a machine without these paths.

    Raises:
      UsageError: naming the field and the path.
    """
    fields = [
        ("data.data_dir", os.path.isdir, "a directory"),
        ("data.manual_dir", os.path.isdir, "a directory"),
        ("data.dir", os.path.isdir, "a directory of images"),
    ]
    if "eval" in config:
        readable = lambda p: os.path.isfile(p) and os.access(p, os.R_OK)
        fields.append(("eval.inception_path", readable, "a readable file"))
    for field, ok, what in fields:
        path = _get(config, field)
        if path is not None and not ok(os.path.expanduser(path)):
            _fail(field, path, f"expected {what}; it does not exist or cannot be read")


def _validate_folder(config: ml_collections.ConfigDict) -> None:
    """The fields of a folder dataset (``data.name="folder"``: ``data.dir`` and ``image_size``)."""
    for field in ("data.dir", "data.cache_dir"):
        _path(config, field)
    _choice(config, "data.crop", folder_images.CROPS)
    channels = _get(config, "data.channels")
    if channels is not None and channels not in folder_images.CHANNELS:
        _fail("data.channels", channels, f"expected one of {list(folder_images.CHANNELS)} or None")
    _bool(config, "data.upscale")
    _bool(config, "data.skip_unreadable")
    if "captions" in config.data:  # absent from runs saved before it existed
        _bool(config, "data.captions", optional=True)
    if config.data.name == folder_source.FOLDER:
        if config.data.dir is None:
            _fail("data.dir", None, "data.name='folder' needs the folder of images")
        if config.data.image_size is None:
            _fail("data.image_size", None, "data.name='folder' needs the side of its images")


def _divides(field: str, value: int, other: str, other_value: int) -> None:
    if other_value % value:
        _fail(field, value, f"must divide {other}={other_value}")


def _validate_latent(config: ml_collections.ConfigDict) -> None:
    """The ``latent`` section and what it implies for ``model`` and ``sample``."""
    unknown = sorted(set(config.latent.keys()) - set(latent_config().keys()))
    if unknown:
        raise UsageError(
            f"config.latent has unknown field(s) {unknown}; allowed: {sorted(latent_config())}"
        )
    for field in latent_config().keys():
        if field == "vae_block_out_channels":
            _int_tuple(config, "latent.vae_block_out_channels", allow_empty=False)
        elif field == "vae_lr":
            _float(config, "latent.vae_lr", 0.0, float("inf"), lo_open=True)
        elif field == "vae_kl_weight":
            _float(config, "latent.vae_kl_weight", 0.0, float("inf"))
        else:
            _int(config, f"latent.{field}", 1)
    c = config.latent
    for width in c.vae_block_out_channels:
        _divides("latent.vae_norm_num_groups", c.vae_norm_num_groups, "a VAE width", width)
    factor = 2 ** (len(c.vae_block_out_channels) - 1)
    if c.image_size % factor:
        _fail("latent.image_size", c.image_size, f"must be divisible by {factor} (VAE levels)")
    latent_size, unet_factor = c.image_size // factor, 2 ** (len(config.model.ch_mult) - 1)
    if latent_size % unet_factor:
        _fail(
            "model.ch_mult",
            tuple(config.model.ch_mult),
            f"needs latent sides divisible by {unet_factor}; the latents are "
            f"{latent_size}x{latent_size}",
        )
    _divides("latent.text_num_heads", c.text_num_heads, "latent.text_width", c.text_width)
    _divides("model.num_heads", config.model.num_heads, "latent.text_width", c.text_width)
    if config.sample.num_samples:
        _fail(
            "sample.num_samples",
            config.sample.num_samples,
            "must be 0 in a latent run: samples are drawn per prompt "
            "(config.latent.samples_per_prompt)",
        )


__all__ = ["check_paths", "default_config", "latent_config", "validate"]
