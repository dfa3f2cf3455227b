"""The latent-diffusion pipeline: config section, frozen VAE, run loop, per-prompt samples, CLI.

Composes the pieces of :mod:`ddpm_jax.latent` with the ordinary run loop
(:func:`ddpm_jax.train.run`): :func:`train_latent` trains (or loads) the autoencoder of
``config.latent``, freezes it, encodes the training images into scaled latents and trains a
:class:`~ddpm_jax.latent.PromptUNet` on (latent, prompt id) pairs; :func:`sample_prompt_images`
draws guided samples for any prompts and decodes them; :func:`write_prompt_outputs` writes the
per-prompt grids and ``samples.npz``; :func:`main` is the command line of the latent
experiments (``experiments/latent_digits.py``, ``experiments/cifar_latent.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import cli, schedules, train
from ddpm_jax import config as config_lib
from ddpm_jax import images as images_lib
from ddpm_jax.latent import (
    LatentDataset,
    PromptUNet,
    encode_latents,
    make_decode_fn,
    prompt_table,
    resize_images,
    sample_from_tokens,
)
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.text import TextEncoder, Tokenizer
from ddpm_jax.models.unet import UNet
from ddpm_jax.parallel import compiler_options
from ddpm_jax.vae_train import train_autoencoder


def latent_config() -> ml_collections.ConfigDict:
    """Defaults of the ``config.latent`` section read by :func:`train_latent`.

    Fields: ``image_size`` (images are resized to it before encoding); the autoencoder's
    ``vae_block_out_channels, vae_layers_per_block, vae_norm_num_groups, vae_latent_channels``
    and its training ``vae_steps, vae_batch_size, vae_lr, vae_kl_weight``; the text encoder's
    ``text_width, text_depth, text_num_heads, text_max_length``; ``samples_per_prompt`` (final
    samples written by the experiment).
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


def validate_latent_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.latent`` (and what it implies for ``config.model``); raises ValueError."""
    if "latent" not in config:
        raise ValueError("config.latent is missing; add ddpm_jax.latent.latent_config()")
    c = config.latent
    unknown = sorted(set(c.keys()) - set(latent_config().keys()))
    if unknown:
        raise ValueError(f"config.latent has unknown field(s) {unknown}")

    def positive(field, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.latent.{field}={value!r} is invalid: expected an int >= 1")

    for field in (
        "image_size",
        "vae_layers_per_block",
        "vae_norm_num_groups",
        "vae_latent_channels",
        "vae_steps",
        "vae_batch_size",
        "text_width",
        "text_depth",
        "text_num_heads",
        "text_max_length",
        "samples_per_prompt",
    ):
        positive(field, c[field])
    chans = c.vae_block_out_channels
    if not isinstance(chans, tuple | list) or not chans:
        raise ValueError(
            f"config.latent.vae_block_out_channels={chans!r}: expected a tuple of ints"
        )
    for v in chans:
        positive("vae_block_out_channels", v)
        if v % c.vae_norm_num_groups:
            raise ValueError(
                f"config.latent.vae_norm_num_groups={c.vae_norm_num_groups} must divide every "
                f"entry of vae_block_out_channels={tuple(chans)}"
            )
    factor = 2 ** (len(chans) - 1)
    if c.image_size % factor:
        raise ValueError(
            f"config.latent.image_size={c.image_size} must be divisible by {factor} "
            f"(vae_block_out_channels has {len(chans)} levels)"
        )
    latent_size = c.image_size // factor
    unet_factor = 2 ** (len(config.model.ch_mult) - 1)
    if latent_size % unet_factor:
        raise ValueError(
            f"config.model.ch_mult={tuple(config.model.ch_mult)} needs latent sides divisible by "
            f"{unet_factor}; the latents are {latent_size}x{latent_size}"
        )
    if not (isinstance(c.vae_lr, int | float) and c.vae_lr > 0):
        raise ValueError(f"config.latent.vae_lr={c.vae_lr!r} is invalid: expected a number > 0")
    if not (isinstance(c.vae_kl_weight, int | float) and c.vae_kl_weight >= 0):
        raise ValueError(f"config.latent.vae_kl_weight={c.vae_kl_weight!r}: expected >= 0")
    if c.text_width % c.text_num_heads:
        raise ValueError(
            f"config.latent.text_num_heads={c.text_num_heads} must divide text_width={c.text_width}"
        )
    if c.text_width % config.model.num_heads:
        raise ValueError(
            f"config.model.num_heads={config.model.num_heads} must divide "
            f"config.latent.text_width={c.text_width}"
        )


def build_vae(config: ml_collections.ConfigDict, channels: int) -> AutoencoderKL:
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


def build_prompt_unet(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, prompts: Sequence[str]
) -> PromptUNet:
    """The :class:`PromptUNet` of ``config.model`` / ``config.latent`` for ``prompts``."""
    m, c = config.model, config.latent
    unet = UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        context_dim=c.text_width,
        num_heads=m.num_heads,
        num_groups=m.num_groups,
        resblock_conditioning=m.resblock_conditioning,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
    )
    text = TextEncoder(
        vocab_size=tokenizer.vocab_size,
        max_length=c.text_max_length,
        width=c.text_width,
        depth=c.text_depth,
        num_heads=c.text_num_heads,
    )
    return PromptUNet(unet=unet, text=text, prompt_tokens=prompt_table(tokenizer, prompts))


def load_or_train_vae(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: np.ndarray,
    log: Callable[[str], None] = print,
) -> tuple[AutoencoderKL, Any]:
    """The frozen autoencoder of a run: ``workdir/vae.msgpack`` if present, else trained on
    ``images`` ([N, H, W, C] float32 in [-1, 1]) and saved there (so a resumed run reuses it)."""
    vae = build_vae(config, images.shape[-1])
    path = os.path.join(workdir, "vae.msgpack")
    key = jax.random.fold_in(jax.random.key(config.seed), 7)
    template = jax.eval_shape(lambda: vae.init(key, images[:1], sample_posterior=False))
    if os.path.exists(path):
        with open(path, "rb") as f:
            params = flax.serialization.from_bytes(template, f.read())
        log(f"loaded the frozen autoencoder from {path}")
        return vae, params
    c = config.latent
    t0 = time.time()
    params, hist = train_autoencoder(
        vae,
        images,
        key,
        num_steps=c.vae_steps,
        batch_size=min(c.vae_batch_size, len(images)),
        learning_rate=c.vae_lr,
        kl_weight=c.vae_kl_weight,
    )
    log(
        f"autoencoder: {c.vae_steps} steps in {time.time() - t0:.0f} s, final train L1 "
        f"{float(np.mean(hist['recon'][-20:])):.4f}"
    )
    if jax.process_index() == 0:
        with open(path + ".tmp", "wb") as f:
            f.write(flax.serialization.to_bytes(jax.device_get(params)))
        os.replace(path + ".tmp", path)
    return vae, params


@dataclasses.dataclass
class LatentRun:
    """What :func:`train_latent` returns: the pieces to sample and decode.

    Attributes:
      result: the run loop's ``RunResult`` (``result.ema_params`` are the model's EMA variables).
      model: the :class:`PromptUNet`.
      tokenizer: the prompts' tokenizer.
      vae, vae_params: the frozen autoencoder.
      scale_factor: latent scale factor (1 / std of the training latents).
      decode_fn: scaled latents → images in [-1, 1].
      latent_shape: (h, w, c) of one latent.
      schedule: the noise schedule.
    """

    result: Any
    model: PromptUNet
    tokenizer: Tokenizer
    vae: AutoencoderKL
    vae_params: Any
    scale_factor: float
    decode_fn: Callable[[jax.Array], jax.Array]
    latent_shape: tuple[int, ...]
    schedule: schedules.Schedule


def train_latent(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: np.ndarray,
    classes: np.ndarray,
    prompts: Sequence[str],
    prompt_class: np.ndarray,
    log: Callable[[str], None] = print,
) -> LatentRun:
    """Latent diffusion end to end: frozen VAE → scaled latents → prompt-conditioned run loop.

    Every image is paired with every prompt naming its class (one dataset example per pair);
    ``train.p_uncond`` drops prompts to the empty one.

    Args:
      config: a ``default_config()`` with a ``latent`` section (:func:`latent_config`);
        ``config.model`` configures the UNet and ``config.data`` is not read.
      workdir: the run's directory (``vae.msgpack``, ``latent.json`` and the run loop's files).
      images: [N, H, W, C] uint8 training images (resized to ``latent.image_size``).
      classes: [N] int32 class of each image.
      prompts: P prompts; ``prompt_class[p]`` is the class prompt ``p`` names.
      log: progress printer.

    Raises:
      ValueError: invalid config or inputs (before anything is compiled).
    """
    validate_latent_config(config)
    c = config.latent
    prompt_class = np.asarray(prompt_class, np.int32)
    if len(prompts) != len(prompt_class):
        raise ValueError("prompts and prompt_class must have the same length")
    tokenizer = Tokenizer.from_prompts(prompts, max_length=c.text_max_length)
    model = build_prompt_unet(config, tokenizer, prompts)
    workdir = config_lib.check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)

    if images.shape[1:3] != (c.image_size, c.image_size):
        images = resize_images(images, c.image_size)
    x = images.astype(np.float32) / 127.5 - 1.0
    vae, vae_params = load_or_train_vae(config, workdir, x, log)
    latents, scale = encode_latents(vae, vae_params, x)
    log(f"latents {latents.shape[1:]} (scale factor 1/std = {scale:.4f})")
    with open(os.path.join(workdir, "latent.json"), "w") as f:
        json.dump({"scale_factor": scale, "prompts": list(prompts)}, f, indent=1)

    # One example per (image, prompt naming its class).
    by_class = {k: np.flatnonzero(prompt_class == k) for k in np.unique(prompt_class)}
    rows, labels = [], []
    for i, k in enumerate(np.asarray(classes)):
        for p in by_class.get(int(k), ()):
            rows.append(i)
            labels.append(p)
    if not rows:
        raise ValueError("no image has a class that a prompt names")
    dataset = LatentDataset(
        latents[np.asarray(rows)],
        np.asarray(labels, np.int32),
        num_classes=len(prompts),
        global_batch_size=config.train.batch_size,
        seed=config.seed,
    )
    decode_fn = make_decode_fn(vae, vae_params, scale)
    result = train.run(config, workdir, model=model, dataset=dataset, decode_fn=decode_fn)
    return LatentRun(
        result=result,
        model=model,
        tokenizer=tokenizer,
        vae=vae,
        vae_params=vae_params,
        scale_factor=scale,
        decode_fn=decode_fn,
        latent_shape=tuple(latents.shape[1:]),
        schedule=train.build_schedule(config),
    )


def sample_prompt_images(
    run: LatentRun, config: ml_collections.ConfigDict, prompts: Sequence[str]
) -> np.ndarray:
    """``config.latent.samples_per_prompt`` decoded samples of every prompt, with guidance.

    Uses ``config.sample``'s ``method, num_steps, guidance_scale, clip_x0, batch_size`` and the
    EMA parameters of ``run.result``; prompts may be any text (unknown words become UNK).
    Deterministic in ``config.seed``.

    Returns:
      uint8 [len(prompts), samples_per_prompt, H, W, C].
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
    key = jax.random.fold_in(jax.random.key(config.seed), 2_000_000_003)
    batch = min(len(tokens), max(n, s.batch_size // n * n))
    out = []
    for i in range(0, len(tokens), batch):
        chunk = tokens[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        imgs = sample_fn(run.result.ema_params, jax.random.fold_in(key, i), chunk, s.guidance_scale)
        out.append(np.asarray(images_lib.to_uint8(imgs))[: batch - pad])
    out = np.concatenate(out)
    return out.reshape(len(prompts), n, *out.shape[1:])


def write_prompt_outputs(
    workdir: str, prompts: Sequence[str], samples: np.ndarray, prompt_class: np.ndarray
) -> str:
    """Writes ``prompts/<prompt>.png`` grids for all ``prompts`` and ``samples.npz`` for the
    first ``len(prompt_class)`` of them (``images`` [N, H, W, C] uint8, ``labels`` [N] int32 =
    the class each sample's prompt names). Returns the path of ``samples.npz``."""
    os.makedirs(os.path.join(workdir, "prompts"), exist_ok=True)
    n = samples.shape[1]
    cols = int(np.ceil(np.sqrt(n)))
    for p, imgs in zip(prompts, samples, strict=True):
        slug = re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")
        images_lib.save_png_grid(os.path.join(workdir, "prompts", f"{slug}.png"), imgs, cols)
    k = len(prompt_class)
    path = os.path.join(workdir, "samples.npz")
    np.savez(
        path + ".tmp.npz",
        images=samples[:k].reshape(k * n, *samples.shape[2:]),
        labels=np.repeat(np.asarray(prompt_class, np.int32), n),
    )
    os.replace(path + ".tmp.npz", path)
    return path


def validate_latent_experiment(config: ml_collections.ConfigDict) -> None:
    """The latent experiments' own checks: ``config.latent`` and no ``sample.num_samples``.

    Raises:
      ValueError: naming the field.
    """
    validate_latent_config(config)
    if config.sample.num_samples:
        raise ValueError(
            "config.sample.num_samples must be 0 here: the samples are drawn per prompt "
            "(config.latent.samples_per_prompt)"
        )


def main(
    get_config: Callable[[], ml_collections.ConfigDict],
    run_fn: Callable[[ml_collections.ConfigDict, str], Any],
    argv: Sequence[str] | None = None,
) -> None:
    """Command line of the latent experiments: :func:`ddpm_jax.cli.main` (flags, multi-process
    start, one-line errors with exit code 2, exit code 1 on a non-finite loss) running
    ``run_fn(config, workdir)`` after :func:`validate_latent_experiment`."""

    def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
        try:
            return run_fn(config, workdir)
        except train.NonFiniteLossError:
            raise
        except ValueError as e:  # a config the networks or the data cannot take
            raise train.ConfigError(str(e)) from e

    cli.main(get_config, argv, run_fn=run, validate_fn=validate_latent_experiment)


__all__ = [
    "LatentRun",
    "build_prompt_unet",
    "build_vae",
    "latent_config",
    "load_or_train_vae",
    "main",
    "sample_prompt_images",
    "train_latent",
    "validate_latent_config",
    "validate_latent_experiment",
    "write_prompt_outputs",
]
