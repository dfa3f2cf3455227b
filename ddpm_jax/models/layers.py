"""Building blocks shared by the diffusion networks (Flax linen, NHWC).

Every block computes in ``dtype`` (e.g. ``jnp.bfloat16``) while keeping its parameters in float32;
normalisation statistics and attention softmax are always computed in float32.

Initialisation follows the original DDPM code (Ho et al. 2020, ``diffusion_tf/nn.py``): kernels
are ``variance_scaling(1.0, 'fan_avg', 'uniform')``, biases zero, and the last layer of every
residual branch (``ResBlock.conv2``, ``AttnBlock.proj_out``, ``SpatialTransformer.proj_out``)
starts at exactly zero, so each block is the identity map (on its shortcut) at initialisation.
"""

import functools
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


def _group_moments(x3: jax.Array, num_groups: int, epsilon: float):
    """Per-channel mean and 1 / std of each group of ``x3: [B, N, C]`` (float32), as [B, C]."""
    b, n, c = x3.shape
    d = c // num_groups

    def group_mean(per_channel_sum):  # [B, C] sums over N -> [B, C] means over the group
        return jnp.repeat(per_channel_sum.reshape(b, num_groups, d).sum(-1), d, axis=-1) / (n * d)

    # Two passes (the mean, then the mean squared deviation from it): exact where
    # E[x^2] - E[x]^2 cancels (|mean| >> std). Sums run per channel over N first: XLA's CPU
    # reductions over a group's two axes at once were 10x slower.
    mean = group_mean(jnp.sum(x3, axis=1))
    centred = x3 - mean[:, None]
    var = group_mean(jnp.sum(centred * centred, axis=1))
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float = 1e-6,
    swish: bool = False,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Group normalisation with per-channel affine map, optionally followed by swish.

    ``y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias`` (then ``y * sigmoid(y)`` with
    ``swish``), statistics over all non-batch positions of each group of ``C / num_groups``
    channels, computed in float32. The gradient is written out by hand (two passes over ``x``
    and ``dy``; the residuals are ``x`` and [B, C] statistics), which XLA runs several times
    faster than the autodiff of the same expression.

    Args:
      x: [B, ..., C] features.
      scale: [C] float32.
      bias: [C] float32.
      num_groups: G, divides C.
      epsilon: added to the variance.
      swish: apply ``y * sigmoid(y)`` to the result.
      dtype: output dtype.

    Returns:
      [B, ..., C] in ``dtype``.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish, dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish, dtype):
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
    mean, rstd = _group_moments(x3, num_groups, epsilon)
    a = rstd * scale  # y = x * a + (bias - mean * a): one affine map per example and channel
    y = x3 * a[:, None] + (bias - mean * a)[:, None]
    if swish:
        # Ending in a division (an "expensive" op to XLA) keeps XLA from recomputing the whole
        # normalisation inside each consumer (e.g. the transposes of the convolution's backward
        # pass, which would then evaluate it element by element in transposed order).
        y = y / (1.0 + jnp.exp(-y))
    return y.reshape(x.shape).astype(dtype), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, dtype, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    b, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(b, -1, c).astype(jnp.float32)
    dz = dy.reshape(x3.shape).astype(jnp.float32)
    xhat = (x3 - mean[:, None]) * rstd[:, None]
    if swish:  # d/dz [z sigmoid(z)] = s (1 + z (1 - s))
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        dz = dz * (s * (1.0 + z * (1.0 - s)))
    s1 = jnp.sum(dz, axis=1)  # [B, C]
    s2 = jnp.sum(dz * xhat, axis=1)
    d = c // num_groups
    n = x3.shape[1] * d

    def group_mean(v):  # [B, C] -> mean over each group's channels, per channel, / n
        return jnp.repeat(v.reshape(b, num_groups, d).sum(-1), d, axis=-1) / n

    mean_dxhat, mean_dxhat_xhat = group_mean(s1 * scale), group_mean(s2 * scale)
    dx = (rstd * scale)[:, None] * dz - rstd[:, None] * (
        mean_dxhat[:, None] + xhat * mean_dxhat_xhat[:, None]
    )
    return dx.reshape(x.shape).astype(x.dtype), jnp.sum(s2, 0), jnp.sum(s1, 0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """Group normalisation over (H, W, C / G) per example and group, statistics in float32.

    Attributes:
      num_groups: number of groups G; must divide the channel count C.
      epsilon: added to the variance.
      swish: apply swish to the output (fused; ``swish(GroupNorm(x))``).
      dtype: dtype of the output.

    Call args:
      x: [B, ..., C] features.

    Returns:
      [B, ..., C] normalised features with per-channel ``scale`` and ``bias`` (float32 params).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    swish: bool = False
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
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.swish, self.dtype)


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO) whose gradients are plain convolutions too.

    Equal to ``jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=
    ("NHWC", "HWIO", "NHWC"))`` with the same gradients, but the backward pass spells out the
    input gradient as a stride-1 convolution with the flipped kernel and the kernel gradient as
    a convolution of transposed operands, both in the forward ``NHWC / HWIO`` layout. XLA's CPU
    backend only rewrites autodiff's convolutions (other dimension orders) into that layout
    outside loops: inside a ``lax.scan`` (several training steps per call) it emitted them as
    naive loops, 10-100x slower.

    Args:
      x: [B, H, W, C_in] input.
      kernel: [KH, KW, C_in, C_out].
      strides: (SH, SW).
      padding: ((top, bottom), (left, right)) explicit zero padding.

    Returns:
      [B, H', W', C_out].
    """
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_CONV_DIMS)


def _conv2d_fwd(x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    ksize, in_size, out_size = kernel.shape[:2], x.shape[1:3], dy.shape[1:3]
    # dx: stride-1 convolution of dy, dilated by the strides, with the flipped kernel (in <-> out).
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    pads = [
        (k - 1 - lo, n + lo - (m - 1) * s - 1)
        for n, m, k, s, (lo, _) in zip(in_size, out_size, ksize, strides, padding, strict=True)
    ]
    dx = jax.lax.conv_general_dilated(
        dy, flipped, (1, 1), pads, lhs_dilation=strides, dimension_numbers=_CONV_DIMS
    )
    # dkernel[kh, kw, i, o] = sum_{b, y, x} x_pad[b, s*y + kh, s*x + kw, i] dy[b, y, x, o]: a
    # convolution with batch C_in, features B and the (stride-dilated) dy as the kernel.
    dk = jax.lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # [C_in, H, W, B]
        jnp.transpose(dy, (1, 2, 0, 3)),  # [H', W', B, C_out]
        (1, 1),
        padding,
        rhs_dilation=strides,
        dimension_numbers=_CONV_DIMS,
    )  # [C_in, >= KH, >= KW, C_out]
    dk = jnp.transpose(dk[:, : ksize[0], : ksize[1]], (1, 2, 0, 3))
    return dx, dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis (a 1x1 convolution), with the kernel gradient computed
    as ``(dy^T x)^T``: the orientation in which XLA's CPU matmul reads both [N, C] operands in
    place (``x^T dy`` made XLA write ``dy`` transposed first).

    Args:
      x: [..., C_in].
      kernel: [C_in, C_out].

    Returns:
      [..., C_out].
    """
    return jnp.dot(x, kernel)


def _pointwise_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk_t = jax.lax.dot_general(dy2, x2, (((0,), (0,)), ((), ())))  # [C_out, C_in]
    return jnp.dot(dy, kernel.T), dk_t.T.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.strides
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if k == 1 and s == 1 and self.padding in ("SAME", "VALID", ((0, 0), (0, 0))):
            return pointwise(x, kernel[0, 0]) + bias
        padding = self.padding
        if isinstance(padding, str):
            padding = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (s, s), padding)
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        return conv2d(x, kernel, (s, s), padding) + bias


def make_conv(
    features: int,
    name: str,
    dtype: Dtype,
    kernel: int = 3,
    strides: int = 1,
    padding: Any = "SAME",
    kernel_init: Any = default_init,
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
    """
    return Conv(features, kernel, strides, padding, kernel_init, dtype, name=name)


class _DenseParams(nn.Module):
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

    Call args:
      x: [..., C_in].

    Returns:
      [..., features].
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = default_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = pointwise(x.astype(self.dtype), kernel.astype(self.dtype))
        if not self.use_bias:
            return y
        return y + self.param("bias", zeros_init, (self.features,)).astype(self.dtype)


def make_dense(
    features: int, name: str, dtype: Dtype, use_bias: bool = True, kernel_init: Any = default_init
) -> Dense:
    """A :class:`Dense` layer on the last axis computing in ``dtype`` with float32 parameters.

    Args:
      features: output width.
      name: parameter-scope name.
      dtype: compute dtype.
      use_bias: whether to add a bias.
      kernel_init: kernel initialiser (DDPM's fan-avg uniform by default; zeros for last layers).
    """
    return Dense(features, use_bias, kernel_init, dtype, name=name)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(key: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds, Salmon et al. 2011) of the counters ``(x1, x2)`` under ``key``
    ([2] uint32), written out with plain integer ops so that XLA fuses it into its consumer.
    Bit-identical to ``jax.extend.random.threefry_2x32``, whose CPU lowering is a rolled loop of
    whole-array passes (an order of magnitude slower for dropout masks)."""
    k1, k2 = key[0], key[1]
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bits(key, shape)`` (uint32) for a threefry key, as one fusible computation.

    Equal bit for bit to ``jax.random.bits`` with ``jax_threefry_partitionable`` on (the default
    since JAX 0.5), where element ``i`` (flat index) is ``xor`` of the two words of
    ``threefry2x32(key, (0, i))``. Other key implementations, the non-partitionable mode and
    arrays of 2**32 or more elements fall back to ``jax.random.bits``.

    Args:
      key: a typed PRNG key or a raw uint32 [2] key (of the default implementation).
      shape: output shape.

    Returns:
      uint32 array of ``shape``.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    impl = jax.random.key_impl(key)
    size = math.prod(shape)
    if "threefry" not in str(impl) or not jax.config.jax_threefry_partitionable or size >= 2**32:
        return jax.random.bits(key, shape)
    counts = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits1, bits2 = _threefry2x32(jax.random.key_data(key), jnp.zeros_like(counts), counts)
    return bits1 ^ bits2


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with the same masks (given the same 'dropout' rng) and results, its
    random bits drawn by :func:`random_bits` instead of the rolled-loop threefry of XLA's CPU
    backend (which made dropout ~12% of the CIFAR-10 UNet's training step on CPU).

    Attributes:
      rate: probability of zeroing an element, in [0, 1).

    Call args:
      x: any shape.
      deterministic: when True, return ``x`` unchanged.

    Returns:
      ``x / (1 - rate)`` where kept, 0 elsewhere (same shape and dtype as ``x``).
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        bits = random_bits(self.make_rng("dropout"), x.shape)
        # jax.random.bernoulli(key, keep_prob): uniform floats in [0, 1) from the top 23 bits.
        one = jnp.uint32(0x3F800000)  # the bits of float32 1.0
        uniform = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
        keep = uniform < jnp.float32(keep_prob)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


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
        h = GroupNorm(self.num_groups, swish=True, dtype=self.dtype, name="norm1")(x)
        h = make_conv(out_ch, "conv1", self.dtype)(h)
        emb_ch = 2 * out_ch if self.conditioning == "scale_shift" else out_ch
        emb = make_dense(emb_ch, "temb_proj", self.dtype)(nn.swish(temb))[:, None, None, :]
        if self.conditioning == "scale_shift":
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h)
            h = nn.swish(h * (1 + scale) + shift)
        else:
            h = GroupNorm(self.num_groups, swish=True, dtype=self.dtype, name="norm2")(h + emb)
        if self.dropout > 0:
            h = Dropout(self.dropout)(h, deterministic=not train)
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
        # q, k and v as one matmul with the three kernels side by side.
        qkv_params = [_DenseParams(c, name=n)(c) for n in ("q", "k", "v")]
        kernel = jnp.concatenate([w for w, _ in qkv_params], axis=1).astype(self.dtype)
        bias = jnp.concatenate([beta for _, beta in qkv_params]).astype(self.dtype)
        qkv = pointwise(h.astype(self.dtype), kernel) + bias
        q, k, v = (a.reshape(heads) for a in jnp.split(qkv, 3, axis=-1))
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


def upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv3x3_same(nearest_upsample_2x(x), kernel)`` computed at the input resolution.

    Output pixel ``(2i + a, 2j + b)`` of the upsampled image sees only 2 x 2 distinct input
    pixels through the 3 x 3 kernel, so each of the four phases ``(a, b)`` is a 2 x 2
    convolution of ``x`` with summed kernel taps: 4/9 of the multiply-adds of convolving the
    upsampled image, and no upsampled copy of ``x``. Equal to the direct form up to float
    rounding.

    Args:
      x: [B, H, W, C_in].
      kernel: [3, 3, C_in, C_out].

    Returns:
      [B, 2H, 2W, C_out].
    """

    def fold(w, axis, phase):  # 3 taps -> the 2 that phase (0 or 1) applies to distinct pixels
        w0, w1, w2 = (jax.lax.index_in_dim(w, i, axis) for i in range(3))
        return jnp.concatenate([w0, w1 + w2] if phase == 0 else [w0 + w1, w2], axis=axis)

    rows = []
    for a in (0, 1):
        ka = fold(kernel, 0, a)
        cols = []
        for b in (0, 1):
            cols.append(conv2d(x, fold(ka, 1, b), (1, 1), ((1 - a, a), (1 - b, b))))
        rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), C_out]
    y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), C_out]
    bsz, h, _, w, _, c = y.shape
    return y.reshape(bsz, 2 * h, 2 * w, c)


class _UpsampleConv(nn.Module):
    """The 3x3 convolution of :class:`Upsample` (parameters as :class:`Conv`), applied through
    :func:`upsample_conv`."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", default_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", zeros_init, (self.features,))
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return upsample_conv(x, kernel) + bias


class Upsample(nn.Module):
    """Doubles H and W by nearest-neighbour repetition followed by a 3x3 convolution.

    Computed without forming the upsampled image (:func:`upsample_conv`).

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
        return _UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)
