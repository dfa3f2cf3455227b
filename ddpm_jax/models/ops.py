"""Kernels of the networks: functions on arrays, no Flax modules and no parameters.

Every kernel comes in two families with the same results (up to float rounding), chosen by its
``kernels`` argument, one of :data:`KERNELS`:

- ``"xla"``: plain ``jax.lax`` / ``jax.numpy`` ops differentiated by JAX itself (forward and
  reverse mode: ``jax.jvp``, ``jax.jacfwd``, ``jax.grad``), and dropout bits from JAX's own
  threefry primitive. What GPUs and TPUs compile best.
- ``"cpu"``: the kernels of :mod:`ddpm_jax.models.cpu_kernels`, tuned for XLA's CPU backend
  (custom VJPs, so reverse mode only; fused threefry bits).
- ``"auto"``: ``"cpu"`` when ``jax.default_backend()`` is the CPU at trace time, else ``"xla"``.

Kernels: :func:`conv2d`, :func:`pointwise` (1x1 convolution / dense layer),
:func:`upsample_conv`, :func:`group_norm` (optionally fused with swish), :func:`attention`,
:func:`random_bits` and :func:`dropout`. Dropout masks are ``flax.linen.Dropout``'s for the same
key, or, given each row's index in the global batch, a function of (key, index) alone
(:func:`random_bits`), so that splitting a batch over devices does not change them.

The Flax blocks that own the parameters and call these kernels are in
:mod:`ddpm_jax.models.layers` and :mod:`ddpm_jax.models.attention`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

from ddpm_jax.models import cpu_kernels

Dtype = Any

# The kernel families (the ``kernels`` attribute of every block and of the UNet).
KERNELS = ("auto", "xla", "cpu")

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve_kernels(kernels: str) -> str:
    """The family that ``kernels`` selects now: ``"xla"`` or ``"cpu"``.

    Args:
      kernels: one of :data:`KERNELS`; ``"auto"`` is ``"cpu"`` when ``jax.default_backend()`` is
        ``"cpu"`` (decided when the calling function is traced) and ``"xla"`` otherwise.

    Raises:
      ValueError: ``kernels`` is not one of :data:`KERNELS`.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    kernels: str = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated`` in the NHWC / HWIO layout.

    Args:
      x: [B, H, W, C_in] input.
      kernel: [KH, KW, C_in, C_out].
      strides: (SH, SW).
      padding: ((top, bottom), (left, right)) explicit zero padding.
      kernels: one of :data:`KERNELS` (``"cpu"``: :func:`cpu_kernels.conv2d`).

    Returns:
      [B, H', W', C_out].
    """
    if resolve_kernels(kernels) == "cpu":
        return cpu_kernels.conv2d(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_CONV_DIMS)


def pointwise(x: jax.Array, kernel: jax.Array, kernels: str = "auto") -> jax.Array:
    """``x @ kernel`` over the last axis (a 1x1 convolution or a dense layer).

    Args:
      x: [..., C_in].
      kernel: [C_in, C_out].
      kernels: one of :data:`KERNELS` (``"cpu"``: :func:`cpu_kernels.pointwise`).

    Returns:
      [..., C_out].
    """
    if resolve_kernels(kernels) == "cpu":
        return cpu_kernels.pointwise(x, kernel)
    return jnp.dot(x, kernel)


def upsample_conv(x: jax.Array, kernel: jax.Array, kernels: str = "auto") -> jax.Array:
    """``conv3x3_same(nearest_upsample_2x(x), kernel)``.

    Args:
      x: [B, H, W, C_in].
      kernel: [3, 3, C_in, C_out].
      kernels: one of :data:`KERNELS` (``"cpu"``: :func:`cpu_kernels.upsample_conv`, four 2x2
        convolutions at the input resolution).

    Returns:
      [B, 2H, 2W, C_out].
    """
    if resolve_kernels(kernels) == "cpu":
        return cpu_kernels.upsample_conv(x, kernel)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(
        up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_CONV_DIMS
    )


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float = 1e-6,
    swish: bool = False,
    dtype: Dtype = jnp.float32,
    kernels: str = "auto",
) -> jax.Array:
    """Group normalisation with per-channel affine map, optionally followed by swish.

    ``y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias`` (then ``y * sigmoid(y)`` with
    ``swish``), statistics over all non-batch positions of each group of ``C / num_groups``
    channels, computed in float32 (two passes: the mean, then the mean squared deviation).

    Args:
      x: [B, ..., C] features.
      scale: [C] float32.
      bias: [C] float32.
      num_groups: G, divides C.
      epsilon: added to the variance.
      swish: apply ``y * sigmoid(y)`` to the result.
      dtype: output dtype.
      kernels: one of :data:`KERNELS` (``"cpu"``: :func:`cpu_kernels.group_norm`, a hand-written
        gradient).

    Returns:
      [B, ..., C] in ``dtype``.
    """
    if resolve_kernels(kernels) == "cpu":
        return cpu_kernels.group_norm(x, scale, bias, num_groups, epsilon, swish, dtype)
    c = x.shape[-1]
    xg = x.reshape(x.shape[0], -1, num_groups, c // num_groups).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias
    if swish:
        y = y * jax.nn.sigmoid(y)
    return y.astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head scaled dot-product attention (plain XLA in both kernel families).

    Args:
      q: [B, Lq, N, D] queries (N heads of width D).
      k: [B, Lk, N, D] keys.
      v: [B, Lk, N, D] values.

    Returns:
      [B, Lq, N, D] attention output, in the dtype of ``q``.
    """
    return jax.nn.dot_product_attention(q, k, v)


def random_bits(
    key: jax.Array,
    shape: tuple[int, ...],
    example_index: jax.Array | None = None,
    kernels: str = "auto",
) -> jax.Array:
    """Random uint32 bits: ``jax.random.bits(key, shape)``, or keyed by each row's global index.

    - ``example_index=None``: ``jax.random.bits(key, shape)`` bit for bit. The ``"cpu"`` family
      computes it as one fusible expression for threefry keys in the partitionable mode (the
      default since JAX 0.5: element ``i``, flat index, is the ``xor`` of the two words of
      ``threefry2x32(key, (0, i))``); other keys, the non-partitionable mode and arrays of 2**32
      or more elements call ``jax.random.bits``.
    - ``example_index`` given (row ``b`` is example ``example_index[b]`` of the global batch):
      element ``e`` (flat index within its row) of row ``b`` is the ``xor`` of the two words of
      ``threefry2x32(key, (example_index[b], e))``, whatever the partitionable mode, in both
      families (``"xla"``: JAX's ``threefry2x32_p``; ``"cpu"``: the fused
      :func:`cpu_kernels.threefry2x32`). A row's bits depend only on the key and its index, so
      the same key on every device gives every example the same bits however the batch is
      split. Non-threefry keys (and rows of 2**32 or more elements) use
      ``jax.random.bits(fold_in(key, example_index[b]), shape[1:])`` per row instead.

    Args:
      key: a typed PRNG key or a raw uint32 [2] key (of the default implementation).
      shape: output shape, [B, ...] when ``example_index`` is given.
      example_index: optional int32 [B] non-negative global row indices.
      kernels: one of :data:`KERNELS`.

    Returns:
      uint32 array of ``shape``.
    """
    family = resolve_kernels(kernels)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    threefry = "threefry" in str(jax.random.key_impl(key))
    if example_index is None:
        size = math.prod(shape)
        partitionable = jax.config.jax_threefry_partitionable
        if family == "xla" or not threefry or not partitionable or size >= 2**32:
            return jax.random.bits(key, shape)
        counts = jax.lax.iota(jnp.uint32, size).reshape(shape)
        bits1, bits2 = cpu_kernels.threefry2x32(
            jax.random.key_data(key), jnp.zeros_like(counts), counts
        )
        return bits1 ^ bits2
    example_index = jnp.asarray(example_index)
    if len(shape) < 1 or example_index.shape != shape[:1]:
        raise ValueError(
            f"random_bits: example_index must have shape [B] = {shape[:1]}, got "
            f"{example_index.shape}"
        )
    if not jnp.issubdtype(example_index.dtype, jnp.integer):
        raise ValueError(f"random_bits: example_index must be integer, got {example_index.dtype}")
    row_size = math.prod(shape[1:])
    if not threefry or row_size >= 2**32:
        # lax.map, not vmap: a batched rng_bit_generator (the "rbg" keys) draws other bits.
        row_bits = lambda i: jax.random.bits(jax.random.fold_in(key, i), shape[1:])
        return jax.lax.map(row_bits, example_index)
    rows = example_index.astype(jnp.uint32).reshape((-1,) + (1,) * (len(shape) - 1))
    rows = jnp.broadcast_to(rows, shape)
    counts = jnp.broadcast_to(jax.lax.iota(jnp.uint32, row_size).reshape(shape[1:]), shape)
    data = jax.random.key_data(key)
    if family == "cpu":
        bits1, bits2 = cpu_kernels.threefry2x32(data, rows, counts)
    else:
        bits1, bits2 = threefry2x32_p.bind(data[0], data[1], rows, counts)
    return bits1 ^ bits2


def dropout(
    x: jax.Array,
    key: jax.Array,
    rate: float,
    example_index: jax.Array | None = None,
    kernels: str = "auto",
) -> jax.Array:
    """Inverted dropout; with ``example_index=None`` the mask of ``flax.linen.Dropout(rate)``.

    The mask keeps element ``i`` where the uniform float of its bits (:func:`random_bits`, the top
    23 bits as ``jax.random.uniform`` maps them) is below ``1 - rate``: with
    ``example_index=None`` that is ``jax.random.bernoulli(key, 1 - rate, x.shape)`` bit for bit;
    with ``example_index`` each row's mask depends only on ``key`` and the row's global index.
    The ``"cpu"`` family draws the bits with the fused threefry (the rolled-loop threefry of
    XLA's CPU backend made dropout ~12% of the CIFAR-10 UNet's training step on CPU).

    Args:
      x: [B, ...] (any shape when ``example_index`` is None).
      key: a typed PRNG key or a raw uint32 [2] key.
      rate: probability of zeroing an element, a Python float in [0, 1).
      example_index: optional int32 [B], each row's position in the global batch.
      kernels: one of :data:`KERNELS`.

    Returns:
      ``x / (1 - rate)`` where kept, 0 elsewhere (same shape and dtype as ``x``).
    """
    keep_prob = 1.0 - rate
    bits = random_bits(key, x.shape, example_index, kernels)
    one = jnp.uint32(0x3F800000)  # the bits of float32 1.0
    uniform = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
    keep = uniform < jnp.float32(keep_prob)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
