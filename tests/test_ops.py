"""Tests for ddpm_jax.models.ops: the kernels against plain JAX / float64 NumPy references.

Known answers: the hand-written VJPs of conv2d and group_norm equal autodiff of the plain
expressions (group_norm in float64); upsample_conv equals a convolution of the upsampled image;
random_bits equals jax.random.bits and dropout equals flax's Bernoulli mask, bit for bit;
attention equals a float64 softmax(q k^T / sqrt(D)) v.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.ops import (
    attention,
    conv2d,
    dropout,
    group_norm,
    random_bits,
    upsample_conv,
)


@pytest.mark.parametrize(
    "shape, k, strides, padding",
    [
        ((2, 8, 8, 3), 3, (1, 1), ((1, 1), (1, 1))),
        ((2, 8, 6, 4), 3, (2, 2), ((0, 1), (0, 1))),  # Downsample
        ((2, 7, 9, 4), 3, (2, 2), ((1, 1), (1, 1))),  # strides not dividing the size
        ((1, 5, 5, 2), 2, (1, 2), ((0, 1), (1, 0))),  # 2x2 kernels of upsample_conv
    ],
)
def test_conv2d_value_and_gradients_equal_lax_autodiff(shape, k, strides, padding):
    """conv2d's hand-written backward pass equals autodiff of lax.conv_general_dilated."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], 5)), jnp.float32)

    def ref(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims)

    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides, padding), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # Inside lax.scan (several training steps per call) too.
    scanned = jax.lax.scan(lambda c, _: (c, vjp(dy)), 0, None, length=1)[1]
    np.testing.assert_allclose(scanned[1][0], vjp_ref(dy)[1], atol=1e-4, rtol=1e-5)


def test_group_norm_gradients_match_float64_reference():
    """group_norm's hand-written backward (with and without swish) equals autodiff of the plain
    two-pass formula evaluated in float64."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 16)) * 2 + 5
    scale, bias = 1 + 0.3 * rng.standard_normal(16), 0.3 * rng.standard_normal(16)
    dy = rng.standard_normal(x.shape)

    def ref(x, scale, bias, swish):
        xg = x.reshape(2, 12, 4, 4)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
        y = ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
        return y * jax.nn.sigmoid(y) if swish else y

    with jax.enable_x64():
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        for swish in (False, True):
            y64, vjp64 = jax.vjp(lambda *a, s=swish: ref(*a, s), *args64)
            grads64 = vjp64(jnp.asarray(dy, jnp.float64))
            y64, grads64 = np.asarray(y64), [np.asarray(g) for g in grads64]
            args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
            y, vjp = jax.vjp(lambda *a, s=swish: group_norm(*a, 4, 1e-6, s), *args32)
            grads = vjp(jnp.asarray(dy, jnp.float32))
            np.testing.assert_allclose(y, y64, atol=2e-5)
            for got, want in zip(grads, grads64, strict=True):
                np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_upsample_conv_equals_conv_of_upsampled_image():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)

    def ref(x, w):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(up, w, (1, 1), "SAME", dimension_numbers=dims)

    y, vjp = jax.vjp(upsample_conv, x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert y.shape == (2, 6, 10, 6)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 8, 8, 16)])
def test_random_bits_equal_jax_random_bits(shape):
    """The fused threefry gives jax.random.bits bit for bit: typed and raw keys, under jit, and
    through the fallback for other key implementations."""
    for key in (jax.random.key(11), jax.random.PRNGKey(3), jax.random.key(5, impl="rbg")):
        expected = jax.random.bits(key, shape)
        np.testing.assert_array_equal(random_bits(key, shape), expected)
        np.testing.assert_array_equal(jax.jit(random_bits, static_argnums=1)(key, shape), expected)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_equals_bernoulli_mask_of_flax(rate):
    """ops.dropout(x, key, rate) is flax.linen.Dropout's computation for that key:
    select(bernoulli(key, 1 - rate), x / (1 - rate), 0), bit for bit (typed and raw keys)."""
    # The shape of a random_bits test above: its eagerly compiled threefry ops are reused.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
    for key in (jax.random.key(3), jax.random.PRNGKey(4)):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        want = jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))
        np.testing.assert_array_equal(dropout(x, key, rate), want)


def test_attention_matches_float64_softmax():
    rng = np.random.default_rng(3)
    b, lq, lk, n, d = 2, 5, 7, 3, 4
    q, k, v = (rng.standard_normal((b, length, n, d)) for length in (lq, lk, lk))
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = np.einsum("bnqk,bknd->bqnd", weights, v)
    got = attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    assert got.shape == (b, lq, n, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
