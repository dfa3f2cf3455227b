"""Latent diffusion with text prompts, composed from the existing pieces (Rombach et al. 2022).

The recipe: train an :class:`~ddpm_jax.models.autoencoder.AutoencoderKL` on images (or load
one), **freeze** it, encode the training images once into latents multiplied by the scale factor
``1 / std(latents)`` (:func:`encode_latents`), train a prompt-conditioned UNet on those latents
with the ordinary run loop (:func:`ddpm_jax.train.run` with ``model=``, ``dataset=`` and
``decode_fn=``), sample latents with any sampler and classifier-free guidance, unscale and decode.

The frozen autoencoder never enters the diffusion training state: latents are computed before
training (a NumPy array), and decoding happens only at sampling time with the VAE variables
captured as constants. Its parameters are therefore neither in the optimizer nor reachable by
gradients.

Prompts as labels. A run trains on a fixed list of P prompts. :class:`PromptUNet` maps a prompt
id ``y`` in ``[0, P]`` to a row of a constant token table (row P is the empty prompt, the null
condition), encodes it with a jointly trained :class:`~ddpm_jax.models.text.TextEncoder` and
cross-attends to the resulting context in the UNet. Because the prompt is addressed by an
integer id, the engine's label dropout (``y -> P`` with probability ``p_uncond``) *is* prompt
dropout, and classifier-free guidance with ``null_label=P`` is guidance against the empty prompt.
Prompts not in the table (new phrasings of known words) are sampled through
:meth:`PromptUNet.from_tokens` (:func:`sample_from_tokens`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ddpm_jax import config as config_lib
from ddpm_jax import guidance, samplers, schedules
from ddpm_jax import images as images_lib
from ddpm_jax.models.autoencoder import (
    AutoencoderKL,
    estimate_scale_factor,
    scale_latents,
    unscale_latents,
)
from ddpm_jax.models.text import PAD_ID, TextEncoder, Tokenizer
from ddpm_jax.models.unet import UNet
from ddpm_jax.vae_train import train_autoencoder


class PromptUNet(nn.Module):
    """A UNet conditioned on prompts addressed by id: ``y`` → tokens → TextEncoder → context.

    Attributes:
      unet: the denoiser; ``context_dim`` must equal ``text.width`` and ``num_classes`` be None.
      text: the text encoder, trained jointly with the UNet.
      prompt_tokens: the constant token table, a tuple of P + 1 rows of L ints; the last row must
        be all ``PAD_ID`` (the empty prompt = the null condition). Build it with
        :func:`prompt_table`.

    Call args (``apply(variables, x, t, y, train=False, rngs=...)``, the UNet's interface with a
    prompt id in place of a class label):
      x: [B, h, w, c] float32 latents.
      t: [B] int32 timesteps in [0, T).
      y: [B] int32 prompt ids in [0, P]; P (= ``num_classes``) is the null prompt.
      train: enables the UNet's dropout.

    Returns:
      [B, h, w, c] float32 prediction.
    """

    unet: UNet
    text: TextEncoder
    prompt_tokens: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        rows = self.prompt_tokens
        if len(rows) < 2 or len({len(r) for r in rows}) != 1:
            raise ValueError(
                "prompt_tokens: expected P + 1 >= 2 rows of equal length (use prompt_table)"
            )
        if any(v != PAD_ID for v in rows[-1]):
            raise ValueError("prompt_tokens: the last row must be the empty prompt (all PAD_ID)")
        if self.unet.num_classes is not None:
            raise ValueError("unet.num_classes must be None: prompts replace class labels")
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"unet.context_dim={self.unet.context_dim} must equal text.width={self.text.width}"
            )
        super().__post_init__()

    @property
    def num_classes(self) -> int:
        """P, the number of prompts; id P is the null (empty) prompt."""
        return len(self.prompt_tokens) - 1

    def tokens_of(self, y: jax.Array) -> jax.Array:
        """Prompt ids [B] in [0, P] → token rows [B, L] int32 (constants, not parameters)."""
        return jnp.asarray(np.asarray(self.prompt_tokens, np.int32))[y]

    def from_tokens(
        self, x: jax.Array, t: jax.Array, tokens: jax.Array, train: bool = False
    ) -> jax.Array:
        """The prediction for arbitrary prompts given as tokens [B, L] (all PAD_ID = null)."""
        context = self.text(tokens)
        return self.unet(x, t, context=context, train=train)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
        return self.from_tokens(x, t, self.tokens_of(jnp.asarray(y, jnp.int32)), train)


def prompt_table(tokenizer: Tokenizer, prompts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The constant token table of :class:`PromptUNet`: ``prompts`` then the empty prompt.

    Args:
      tokenizer: encodes each prompt to ``tokenizer.max_length`` ids.
      prompts: P non-empty prompts (ids ``0 .. P-1``).

    Returns:
      P + 1 rows of ``max_length`` ints; row P is all ``PAD_ID``.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    tokens, mask = tokenizer.encode(prompts + [""])
    empty = [p for p, m in zip(prompts, mask[:-1], strict=True) if not m.any()]
    if empty:
        raise ValueError(
            f"prompts: {empty} encode to the empty prompt, which is the null condition"
        )
    return tuple(tuple(int(v) for v in row) for row in tokens)


def class_prompts(
    templates: Sequence[str], class_names: Sequence[Sequence[str]]
) -> tuple[list[str], np.ndarray]:
    """All phrasings of every class: ``template.format(name)`` for each template and name.

    Args:
      templates: e.g. ``["a handwritten {}", "the digit {}"]``.
      class_names: per class, one or more names, e.g. ``[["zero", "0"], ["one", "1"], ...]``.

    Returns:
      prompts: the P prompts, class by class.
      prompt_class: [P] int32, the class each prompt names.
    """
    prompts, classes = [], []
    for c, names in enumerate(class_names):
        for template in templates:
            for name in names:
                text = template.format(name)
                if text not in prompts:
                    prompts.append(text)
                    classes.append(c)
    return prompts, np.asarray(classes, np.int32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of uint8 [N, H, W, C] to [N, size, size, C]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        r = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
        out.append(r[..., None] if r.ndim == 2 else r)
    return np.stack(out)


def encode_latents(
    vae: AutoencoderKL,
    vae_params: Any,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    scale_factor: float | None = None,
) -> tuple[np.ndarray, float]:
    """Encodes images with the frozen VAE (posterior mean) into scaled diffusion latents.

    Args:
      vae: the autoencoder module.
      vae_params: its variables (read only).
      images: [N, H, W, C] float32 in [-1, 1].
      batch_size: images per encoder call.
      scale_factor: multiply latents by this; None estimates ``1 / std`` from these latents
        (Rombach et al. Sec. 4.3.2).

    Returns:
      (latents [N, H/f, W/f, latent_channels] float32 = mean * scale_factor, scale_factor).
    """
    encode = jax.jit(lambda x: vae.apply(vae_params, x, method=AutoencoderKL.encode)[0])
    images = np.asarray(images, np.float32)
    means = np.concatenate(
        [np.asarray(encode(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )
    if scale_factor is None:
        scale_factor = float(estimate_scale_factor(means))
    return np.asarray(scale_latents(means, scale_factor), np.float32), float(scale_factor)


def make_decode_fn(
    vae: AutoencoderKL, vae_params: Any, scale_factor: float
) -> Callable[[jax.Array], jax.Array]:
    """Scaled diffusion latents [B, h, w, c] → images [B, H, W, C] in [-1, 1] (jittable).

    The VAE variables are closed over as constants: decoding never differentiates them.
    """
    frozen = jax.tree.map(jax.lax.stop_gradient, vae_params)

    def decode(z: jax.Array) -> jax.Array:
        x = vae.apply(frozen, unscale_latents(z, scale_factor), method=AutoencoderKL.decode)
        return jnp.clip(x, -1.0, 1.0)

    return decode


class LatentDataset:
    """In-memory (latent, prompt id) pairs with the batch interface of ``data.ImageDataset``.

    Every batch is a pure function of ``(seed, step, process_index)``: epoch ``e`` is a
    permutation drawn from ``(seed, e)``; the global batch of step ``s`` holds flat positions
    ``[s*B, (s+1)*B)`` of the endless stream, and process ``p`` of ``n`` reads rows
    ``[p*B/n, (p+1)*B/n)``.

    Args:
      latents: [N, h, w, c] float32 diffusion latents.
      labels: [N] int32 prompt ids in [0, num_classes).
      num_classes: number of prompts P.
      global_batch_size: rows per global batch.
      seed: shuffling seed.
      process_index / process_count: this process's slice; None uses jax's.
    """

    def __init__(
        self,
        latents: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        global_batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        latents = np.asarray(latents, np.float32)
        labels = np.asarray(labels, np.int32)
        if latents.ndim != 4 or labels.shape != (latents.shape[0],) or len(labels) == 0:
            raise ValueError(
                f"latents [N, h, w, c] and labels [N] expected, got {latents.shape} and "
                f"{labels.shape}"
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, num_classes={num_classes})")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"process_count={self.process_count}"
            )
        self.name = "latents"
        self.latents, self.labels = latents, labels
        self.num_classes = int(num_classes)
        self.num_examples = len(labels)
        self.image_shape = tuple(latents.shape[1:])
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_examples)
        return self._perms[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """``{"image": [local_B, h, w, c] float32, "label": [local_B] int32}`` of ``step``."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        flat = np.arange(start, start + self.local_batch_size)
        epochs, pos = np.divmod(flat, self.num_examples)
        idx = np.array([self._perm(int(e))[p] for e, p in zip(epochs, pos, strict=True)])
        return {"image": self.latents[idx], "label": self.labels[idx]}

    def iterator(self, start_step: int = 0):
        """Endless iterator over ``batch(start_step), batch(start_step + 1), ...``."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    @property
    def steps_per_epoch(self) -> float:
        return self.num_examples / self.global_batch_size


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
      model: the :class:`PromptUNet`.
      params: its (EMA) variables.
      schedule: the noise schedule it was trained with.
      key: PRNG key of the initial noise and the sampler.
      tokens: [B, L] int32 prompts (``Tokenizer.encode``); unknown words are ``UNK_ID``.
      latent_shape: (h, w, c) of one latent.
      decode_fn: latents → images (:func:`make_decode_fn`); None returns latents.
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


# ----------------------------------------------------------------------------- the pipeline


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
    from ddpm_jax import train  # orchestration: the run loop

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
        )
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


def main(
    get_config: Callable[[], ml_collections.ConfigDict],
    run_fn: Callable[[ml_collections.ConfigDict, str], Any],
    argv: Sequence[str],
) -> None:
    """Command line of the latent experiments, with ``ddpm_jax.cli``'s contract.

    ``--workdir=DIR`` and ``--config.<section>.<field>=VALUE``; a user's mistake (bad flag,
    invalid config, unwritable workdir, unavailable dataset) is one line on stderr and exit
    code 2, before anything is compiled; a non-finite loss exits with 1.
    """
    from ddpm_jax import cli, data, train

    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: {argv[0]} --workdir=DIR [--config.<section>.<field>=VALUE ...]")
        print(f"The config (defaults of this experiment):\n{get_config()}")
        raise SystemExit(0)
    try:
        fv = cli._define_flags(get_config(), argv)
        extra = fv(argv)[1:]
    except Exception as e:  # absl flag errors come in several types
        cli._fail(f"bad command line: {e}")
    if extra:
        cli._fail(f"unexpected positional arguments {extra}")
    config = fv.config
    try:
        config_lib.check_workdir(fv.workdir)
        config_lib.validate(config)
        validate_latent_config(config)
        if config.sample.num_samples:
            raise ValueError(
                "config.sample.num_samples must be 0 here: the samples are drawn per prompt "
                "(config.latent.samples_per_prompt)"
            )
    except ValueError as e:
        cli._fail(str(e))
    try:
        run_fn(config, fv.workdir)
    except (ValueError, data.DataUnavailableError) as e:
        cli._fail(str(e))
    except train.NonFiniteLossError as e:
        cli._fail(str(e), cli.EXIT_DIVERGED)


__all__ = [
    "LatentDataset",
    "LatentRun",
    "build_prompt_unet",
    "build_vae",
    "latent_config",
    "load_or_train_vae",
    "main",
    "train_latent",
    "validate_latent_config",
    "PromptUNet",
    "class_prompts",
    "encode_latents",
    "make_decode_fn",
    "prompt_table",
    "resize_images",
    "sample_prompt_images",
    "write_prompt_outputs",
    "sample_from_tokens",
]
