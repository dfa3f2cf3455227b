"""Building blocks shared by the diffusion networks (Flax linen, NHWC).

Every block computes in ``dtype`` (e.g. ``jnp.bfloat16``) while keeping its parameters in float32;
normalisation statistics and attention softmax are always computed in float32.

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

Dtype = Any

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


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head scaled dot-product attention, logits and softmax in float32.

    Args:
      q: [B, Lq, N, D] queries (N heads of width D).
      k: [B, Lk, N, D] keys.
      v: [B, Lk, N, D] values.

    Returns:
      [B, Lq, N, D] attention output, in the dtype of ``q``.
    """
    return jax.nn.dot_product_attention(q, k, v)


class GroupNorm(nn.Module):
    """Group normalisation over (H, W, C / G) per example and group, statistics in float32.

    Attributes:
      num_groups: number of groups G; must divide the channel count C.
      epsilon: added to the variance.
      dtype: dtype of the output.

    Call args:
      x: [B, ..., C] features.

    Returns:
      [B, ..., C] normalised features with per-channel ``scale`` and ``bias`` (float32 params).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

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
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # all spatial axes and the within-group axis
        # Single-pass moments of data shifted by one sample of each group: as fast as
        # E[x^2] - E[x]^2 (one fused reduction) without its cancellation when |mean| >> std.
        # The output does not depend on the shift, so stopping its gradient is exact.
        first = (slice(None), *([slice(0, 1)] * (x.ndim - 2)), slice(None), slice(0, 1))
        shifted = xg - jax.lax.stop_gradient(xg[first])
        m1 = jnp.mean(shifted, axis=axes, keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(shifted), axis=axes, keepdims=True) - m1 * m1, 0.0)
        y = ((shifted - m1) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def make_conv(
    features: int,
    name: str,
    dtype: Dtype,
    kernel: int = 3,
    strides: int = 1,
    padding: Any = "SAME",
    kernel_init: Any = default_init,
) -> nn.Conv:
    """A square NHWC convolution computing in ``dtype`` with float32 parameters.

    Args:
      features: output channels.
      name: parameter-scope name.
      dtype: compute dtype.
      kernel: kernel size (``kernel x kernel``).
      strides: stride in H and W.
      padding: ``"SAME"`` or explicit ``((top, bottom), (left, right))``.
      kernel_init: kernel initialiser (DDPM's fan-avg uniform by default; zeros for last layers).
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def make_dense(
    features: int, name: str, dtype: Dtype, use_bias: bool = True, kernel_init: Any = default_init
) -> nn.Dense:
    """A Dense layer on the last axis computing in ``dtype`` with float32 parameters.

    Args:
      features: output width.
      name: parameter-scope name.
      dtype: compute dtype.
      use_bias: whether to add a bias.
      kernel_init: kernel initialiser (DDPM's fan-avg uniform by default; zeros for last layers).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


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
      conditioning: ``'additive'`` or ``'scale_shift'``.
      dtype: compute dtype.

    Call args:
      x: [B, H, W, C_in] features.
      temb: [B, E] conditioning embedding (time plus class), before the swish.
      train: dropout is active only when True (uses the 'dropout' rng).

    Returns:
      [B, H, W, out_ch] features.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    num_groups: int = 32
    conditioning: str = "additive"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        if self.conditioning not in ("additive", "scale_shift"):
            raise ValueError(
                f"ResBlock: conditioning must be 'additive' or 'scale_shift', "
                f"got {self.conditioning!r}"
            )
        out_ch = self.out_ch or x.shape[-1]
        h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x))
        h = make_conv(out_ch, "conv1", self.dtype)(h)
        emb_ch = 2 * out_ch if self.conditioning == "scale_shift" else out_ch
        emb = make_dense(emb_ch, "temb_proj", self.dtype)(nn.swish(temb))[:, None, None, :]
        if self.conditioning == "scale_shift":
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h)
            h = nn.swish(h * (1 + scale) + shift)
        else:
            h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h + emb))
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = make_conv(out_ch, "conv2", self.dtype, kernel_init=zeros_init)(h)
        if x.shape[-1] != out_ch:
            x = make_conv(out_ch, "shortcut", self.dtype, kernel=1)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """DDPM self-attention block over all H * W positions, with a residual connection.

    ``x + proj_out(attention(q, k, v))`` with ``q, k, v`` linear maps of ``norm(x)``; each of the
    ``num_heads`` heads has width ``C / num_heads`` (DDPM uses one head). ``proj_out`` starts at
    zero.

    Attributes:
      num_heads: attention heads; must divide C.
      num_groups: GroupNorm groups.
      dtype: compute dtype.

    Call args:
      x: [B, H, W, C] features.

    Returns:
      [B, H, W, C] features.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        if c % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the channel count {c} of the "
                f"attention block '{self.name}'"
            )
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        heads = (b, hh * ww, self.num_heads, c // self.num_heads)
        q, k, v = (make_dense(c, n, self.dtype)(h).reshape(heads) for n in ("q", "k", "v"))
        h = attention(q, k, v).reshape(b, hh, ww, c)
        h = make_dense(c, "proj_out", self.dtype, kernel_init=zeros_init)(h)
        return x.astype(self.dtype) + h


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (self-attention when ``context`` is None).

    Latent-diffusion layout: bias-free ``to_q``/``to_k``/``to_v``, ``to_out`` with bias.

    Attributes:
      num_heads: heads; must divide the width C of ``x``.
      dtype: compute dtype.

    Call args:
      x: [B, L, C] queries.
      context: [B, M, D] keys/values, or None for self-attention.

    Returns:
      [B, L, C].
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, length, c = x.shape
        context = x if context is None else context
        head = c // self.num_heads
        q = make_dense(c, "to_q", self.dtype, use_bias=False)(x)
        k = make_dense(c, "to_k", self.dtype, use_bias=False)(context)
        v = make_dense(c, "to_v", self.dtype, use_bias=False)(context)
        q = q.reshape(b, length, self.num_heads, head)
        k = k.reshape(b, context.shape[1], self.num_heads, head)
        v = v.reshape(b, context.shape[1], self.num_heads, head)
        h = attention(q, k, v).reshape(b, length, c)
        return make_dense(c, "to_out", self.dtype)(h)


class SpatialTransformer(nn.Module):
    """Latent-diffusion spatial transformer: self-attention, cross-attention to a context, MLP.

    ``x + proj_out(block(proj_in(norm(x))))`` where, on the H * W tokens ``u``,
    ``u += self_attn(ln1(u)); u += cross_attn(ln2(u), context); u += geglu_mlp(ln3(u))``
    (one transformer layer, GEGLU MLP of width 4C, no dropout, as in latent diffusion's default).
    ``proj_out`` starts at zero.

    Attributes:
      num_heads: attention heads; must divide C.
      num_groups: GroupNorm groups.
      dtype: compute dtype.

    Call args:
      x: [B, H, W, C] features.
      context: [B, M, D] conditioning sequence (e.g. text-encoder states).

    Returns:
      [B, H, W, C] features.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        if c % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the channel count {c} of the "
                f"spatial transformer '{self.name}'"
            )

        def layer_norm(name):
            return nn.LayerNorm(1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        u = make_dense(c, "proj_in", self.dtype)(h).reshape(b, hh * ww, c)
        attn = lambda name: CrossAttention(self.num_heads, dtype=self.dtype, name=name)
        u = u + attn("attn1")(layer_norm("norm1")(u))
        u = u + attn("attn2")(layer_norm("norm2")(u), context.astype(self.dtype))
        value, gate = jnp.split(
            make_dense(8 * c, "ff_in", self.dtype)(layer_norm("norm3")(u)), 2, -1
        )
        u = u + make_dense(c, "ff_out", self.dtype)(value * nn.gelu(gate, approximate=False))
        h = make_dense(c, "proj_out", self.dtype, kernel_init=zeros_init)(u.reshape(b, hh, ww, c))
        return x.astype(self.dtype) + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 convolution (padding: one row/column at the end).

    Attributes:
      dtype: compute dtype.

    Call args:
      x: [B, H, W, C] features, H and W even.

    Returns:
      [B, H / 2, W / 2, C].
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = make_conv(x.shape[-1], "conv", self.dtype, strides=2, padding=((0, 1), (0, 1)))
        return conv(x)


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition followed by a 3x3 convolution.

    Attributes:
      dtype: compute dtype.

    Call args:
      x: [B, H, W, C] features.

    Returns:
      [B, 2H, 2W, C].
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return make_conv(c, "conv", self.dtype)(x.reshape(b, 2 * h, 2 * w, c))
