"""The CPU-tuned kernels: the ``"cpu"`` family of :mod:`ddpm_jax.models.ops`.

Each kernel equals a JAX primitive or a plain ``jax.numpy`` expression (same results, same
gradients) but is written so that XLA's CPU backend compiles it well: the custom VJPs spell out
gradients as convolutions and matmuls in the forward layout, and the threefry hash fuses into its
consumer. The custom VJPs make these kernels reverse-mode only (``jax.jvp`` / ``jax.jacfwd``
raise); the plain XLA family of :mod:`ddpm_jax.models.ops` supports both modes.

- :func:`conv2d`: NHWC / HWIO convolution with a custom VJP.
- :func:`pointwise`: a matmul over the last axis (a 1x1 convolution) with a custom VJP.
- :func:`upsample_conv`: nearest-neighbour 2x upsampling then a 3x3 convolution, computed at the
  input resolution.
- :func:`group_norm`: group normalisation (optionally fused with swish), float32 statistics,
  custom VJP.
- :func:`threefry2x32`: the threefry-2x32 hash as plain integer ops (fusible dropout bits).

Call them through :mod:`ddpm_jax.models.ops`, which chooses between the two families.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any


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


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds, Salmon et al. 2011) of the counters ``(x1, x2)`` under ``key``,
    written out with plain integer ops so that XLA fuses it into its consumer.

    Bit-identical to ``jax.extend.random.threefry2x32_p``, whose CPU lowering is a rolled loop of
    whole-array passes (an order of magnitude slower for dropout masks).

    Args:
      key: [2] uint32 key data.
      x1: uint32 counters (first word), any shape.
      x2: uint32 counters (second word), the shape of ``x1``.

    Returns:
      The two uint32 output words, each shaped like ``x1``.
    """
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
