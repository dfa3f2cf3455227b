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

This module holds the pure pieces (the prompt-conditioned model, latent encoding and decoding,
the latent dataset, sampling from tokens); :mod:`ddpm_jax.latent_pipeline` composes them with
the run loop (``train_latent``, ``sample_prompt_images``, the experiments' command line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm_jax import guidance, samplers, schedules
from ddpm_jax.models.autoencoder import (
    AutoencoderKL,
    estimate_scale_factor,
    scale_latents,
    unscale_latents,
)
from ddpm_jax.models.text import PAD_ID, TextEncoder, Tokenizer
from ddpm_jax.models.unet import UNet


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


__all__ = [
    "LatentDataset",
    "PromptUNet",
    "class_prompts",
    "encode_latents",
    "make_decode_fn",
    "prompt_table",
    "resize_images",
    "sample_from_tokens",
]
