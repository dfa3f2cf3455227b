"""Flax building blocks of the diffusion networks (linen, NHWC): the modules that own parameters.

Holds the blocks (:class:`GroupNorm`, :class:`Conv` / :class:`Dense` with :func:`make_conv` /
:func:`make_dense`, :class:`Dropout`, :class:`ResBlock`, :class:`Downsample`,
:class:`Upsample`), :func:`timestep_embedding`, the initialisers, and the allowed values
:data:`RESBLOCK_CONDITIONINGS` and :data:`DTYPES`; the attention blocks are in
:mod:`ddpm_jax.models.attention`. The array computations are the kernels of
:mod:`ddpm_jax.models.ops`.

Every block computes in ``dtype`` (e.g. ``jnp.bfloat16``) while keeping its parameters in float32;
normalisation statistics and attention softmax are always computed in float32. Every block's
``kernels`` attribute (one of :data:`~ddpm_jax.models.ops.KERNELS`: ``"auto"``, ``"xla"``,
``"cpu"``) chooses the kernel family; the parameters are the same under all of them.

Initialisation follows the original DDPM code (Ho et al. 2020, ``diffusion_tf/nn.py``): kernels
are ``variance_scaling(1.0, 'fan_avg', 'uniform')``, biases zero, and the last layer of every
residual branch (``ResBlock.conv2``, ``AttnBlock.proj_out``, ``SpatialTransformer.proj_out``)
starts at exactly zero, so each block is the identity map (on its shortcut) at initialisation.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.ops import conv2d, dropout, group_norm, pointwise, upsample_conv

Dtype = Any

# ResBlock.conditioning: DDPM's additive time embedding, or improved-diffusion's FiLM.
RESBLOCK_CONDITIONINGS = ("additive", "scale_shift")
# Compute dtypes by name (e.g. for a config field); parameters are always float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding of DDPM (``get_timestep_embedding`` in diffusion_tf).

    ``emb[:, i] = sin(t * f_i)`` and ``emb[:, half + i] = cos(t * f_i)`` with
    ``f_i = max_period ** (-i / (half - 1))``, ``half = dim // 2``, so frequencies run from 1 down
    to ``1 / max_period``. An odd ``dim`` gets one trailing zero column. This equals diffusers'
    ``get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1)``.

    Args:
      t: [B] int or float timesteps (0-based schedule indices; fractional values are allowed).
      dim: embedding width, >= 4.
      max_period: the longest period, i.e. the inverse of the lowest frequency.

    Returns:
      [B, dim] float32 embedding.
    """
    if dim < 4:
        raise ValueError(f"timestep_embedding: dim must be >= 4, got {dim}")
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape [B], got shape {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """Group normalisation over (H, W, C / G) per example and group, statistics in float32.

    Attributes:
      num_groups: number of groups G; must divide the channel count C.
      epsilon: added to the variance.
      swish: apply swish to the output (fused; ``swish(GroupNorm(x))``).
      dtype: dtype of the output.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, ..., C] features.

    Returns:
      [B, ..., C] normalised features with per-channel ``scale`` and ``bias`` (float32 params).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    swish: bool = False
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups != 0:
            raise ValueError(
                f"num_groups={self.num_groups} must divide the channel count {c} of the "
                f"GroupNorm '{self.name}'"
            )
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", zeros_init, (c,), jnp.float32)
        return group_norm(
            x, scale, bias, self.num_groups, self.epsilon, self.swish, self.dtype, self.kernels
        )


class Conv(nn.Module):
    """A square NHWC convolution with bias, computing in ``dtype`` with float32 parameters.

    Same parameters (``kernel`` [K, K, C_in, features], ``bias`` [features]) and results as
    ``flax.linen.Conv``; the convolution is :func:`conv2d` (1x1 kernels: :func:`pointwise`).

    Attributes:
      features: output channels.
      kernel_size: K.
      strides: stride in H and W.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``.
      kernel_init: kernel initialiser.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C_in].

    Returns:
      [B, H', W', features].
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Any = "SAME"
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.strides
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if k == 1 and s == 1 and self.padding in ("SAME", "VALID", ((0, 0), (0, 0))):
            return pointwise(x, kernel[0, 0], self.kernels) + bias
        padding = self.padding
        if isinstance(padding, str):
            padding = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), padding)
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        return conv2d(x, kernel, (s, s), padding, self.kernels) + bias


def make_conv(
    features: int,
    name: str,
    dtype: Dtype,
    kernel: int = 3,
    strides: int = 1,
    padding: Any = "SAME",
    kernel_init: Any = default_init,
    kernels: str = "auto",
) -> Conv:
    """A square NHWC :class:`Conv` computing in ``dtype`` with float32 parameters.

    Args:
      features: output channels.
      name: parameter-scope name.
      dtype: compute dtype.
      kernel: kernel size (``kernel x kernel``).
      strides: stride in H and W.
      padding: ``"SAME"`` or explicit ``((top, bottom), (left, right))``.
      kernel_init: kernel initialiser (DDPM's fan-avg uniform by default; zeros for last layers).
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.
    """
    return Conv(features, kernel, strides, padding, kernel_init, dtype, kernels, name=name)


class DenseParams(nn.Module):
    """The ``kernel`` [C_in, features] and ``bias`` [features] of a Dense layer (as
    ``flax.linen.Dense`` names and initialises them), returned rather than applied."""

    features: int
    use_bias: bool = True
    kernel_init: Any = default_init

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
        bias = self.param("bias", zeros_init, (self.features,)) if self.use_bias else None
        return kernel, bias


class Dense(nn.Module):
    """A Dense layer on the last axis (:func:`pointwise`), computing in ``dtype`` with float32
    parameters; same parameters and results as ``flax.linen.Dense``.

    Attributes:
      features: output width.
      use_bias: whether to add a bias.
      kernel_init: kernel initialiser.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [..., C_in].

    Returns:
      [..., features].
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = pointwise(x.astype(self.dtype), kernel.astype(self.dtype), self.kernels)
        if not self.use_bias:
            return y
        return y + self.param("bias", zeros_init, (self.features,)).astype(self.dtype)


def make_dense(
    features: int,
    name: str,
    dtype: Dtype,
    use_bias: bool = True,
    kernel_init: Any = default_init,
    kernels: str = "auto",
) -> Dense:
    """A :class:`Dense` layer on the last axis computing in ``dtype`` with float32 parameters.

    Args:
      features: output width.
      name: parameter-scope name.
      dtype: compute dtype.
      use_bias: whether to add a bias.
      kernel_init: kernel initialiser (DDPM's fan-avg uniform by default; zeros for last layers).
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.
    """
    return Dense(features, use_bias, kernel_init, dtype, kernels, name=name)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with the same masks (given the same 'dropout' rng) and results,
    computed by :func:`ddpm_jax.models.ops.dropout`; or, given ``example_index``, masks keyed by
    each row's position in the global batch.

    Attributes:
      rate: probability of zeroing an element, in [0, 1).
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS` (the same masks under
        all of them).

    Call args:
      x: [B, ...] features.
      deterministic: when True, return ``x`` unchanged.
      example_index: optional int32 [B], each row's position in the global batch: row ``b``'s
        mask then depends only on the 'dropout' rng and ``example_index[b]``
        (:func:`ddpm_jax.models.ops.random_bits`), not on the rest of the batch. None: the masks
        of ``flax.linen.Dropout``.

    Returns:
      ``x / (1 - rate)`` where kept, 0 elsewhere (same shape and dtype as ``x``).
    """

    rate: float
    kernels: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool, example_index: jax.Array | None = None
    ) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        key = self.make_rng("dropout")
        return dropout(x, key, self.rate, example_index, self.kernels)


class ResBlock(nn.Module):
    """DDPM residual block with timestep conditioning.

    ``h = conv1(swish(norm1(x))) (+ temb_proj(swish(temb)) if additive)``, then
    ``h = conv2(dropout(swish(norm2(h))))`` where in ``'scale_shift'`` mode (improved-diffusion's
    FiLM) ``norm2(h)`` becomes ``norm2(h) * (1 + scale) + shift`` with
    ``[scale, shift] = temb_proj(swish(temb))``. Returns ``shortcut(x) + h``; the shortcut is a
    1x1 convolution when the channel count changes. ``conv2`` starts at zero.

    Attributes:
      out_ch: output channels (None keeps the input channels).
      dropout: dropout rate before ``conv2``.
      num_groups: GroupNorm groups.
      conditioning: one of :data:`RESBLOCK_CONDITIONINGS`: ``'additive'`` or
        ``'scale_shift'``.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C_in] features.
      temb: [B, E] conditioning embedding (time plus class), before the swish.
      train: dropout is active only when True (uses the 'dropout' rng).
      example_index: optional int32 [B] global batch positions keying the dropout masks
        (see :class:`Dropout`).

    Returns:
      [B, H, W, out_ch] features.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    num_groups: int = 32
    conditioning: str = "additive"
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array,
        train: bool = False,
        example_index: jax.Array | None = None,
    ) -> jax.Array:
        if self.conditioning not in RESBLOCK_CONDITIONINGS:
            raise ValueError(
                f"ResBlock: conditioning must be one of {RESBLOCK_CONDITIONINGS}, "
                f"got {self.conditioning!r}"
            )
        out_ch = self.out_ch or x.shape[-1]
        dt, kn = self.dtype, self.kernels
        norm = lambda name, swish: GroupNorm(
            self.num_groups, swish=swish, dtype=dt, kernels=kn, name=name
        )
        h = norm("norm1", True)(x)
        h = make_conv(out_ch, "conv1", dt, kernels=kn)(h)
        emb_ch = 2 * out_ch if self.conditioning == "scale_shift" else out_ch
        emb = make_dense(emb_ch, "temb_proj", dt, kernels=kn)(nn.swish(temb))[:, None, None, :]
        if self.conditioning == "scale_shift":
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = nn.swish(norm("norm2", False)(h) * (1 + scale) + shift)
        else:
            h = norm("norm2", True)(h + emb)
        if self.dropout > 0:
            h = Dropout(self.dropout, kn)(h, not train, example_index)
        h = make_conv(out_ch, "conv2", dt, kernel_init=zeros_init, kernels=kn)(h)
        if x.shape[-1] != out_ch:
            x = make_conv(out_ch, "shortcut", dt, kernel=1, kernels=kn)(x)
        return x.astype(dt) + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 convolution (padding: one row/column at the end).

    Attributes:
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C] features, H and W even.

    Returns:
      [B, H / 2, W / 2, C].
    """

    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1))
        conv = make_conv(x.shape[-1], "conv", self.dtype, 3, 2, pad, kernels=self.kernels)
        return conv(x)


class _UpsampleConv(nn.Module):
    """The 3x3 convolution of :class:`Upsample` (parameters as :class:`Conv`), applied through
    :func:`upsample_conv`."""

    features: int
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", default_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return upsample_conv(x, kernel, self.kernels) + bias


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition followed by a 3x3 convolution.

    The ``"cpu"`` kernels compute it without forming the upsampled image
    (:func:`ddpm_jax.models.cpu_kernels.upsample_conv`).

    Attributes:
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C] features.

    Returns:
      [B, 2H, 2W, C].
    """

    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _UpsampleConv(x.shape[-1], self.dtype, self.kernels, name="conv")(x)
