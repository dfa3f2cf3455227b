"""Tests for ddpm_jax.models.ops: both kernel families against plain JAX / float64 references.

Known answers, for the "xla" and the "cpu" kernels alike: conv2d (and its gradients) equals
autodiff of lax.conv_general_dilated; group_norm equals autodiff of the plain two-pass formula in
float64; upsample_conv equals a convolution of the upsampled image; random_bits equals
jax.random.bits and dropout equals flax's Bernoulli mask, bit for bit; with an example index the
bits are threefry2x32(key, (index, e)) computed by jax.extend's public threefry_2x32; attention
equals a float64 softmax(q k^T / sqrt(D)) v.
"""

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import cpu_kernels
from ddpm_jax.models.ops import (
    KERNELS,
    attention,
    conv2d,
    dropout,
    group_norm,
    random_bits,
    resolve_kernels,
    upsample_conv,
)

FAMILIES = ("xla", "cpu")


def test_kernel_families_and_auto_resolution(monkeypatch):
    assert KERNELS == ("auto", "xla", "cpu")
    assert jax.default_backend() == "cpu"
    assert resolve_kernels("auto") == "cpu"  # decided by the backend at trace time
    assert [resolve_kernels(k) for k in FAMILIES] == ["xla", "cpu"]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_kernels("auto") == "xla"
    assert resolve_kernels("cpu") == "cpu"  # an explicit choice holds on any backend
    with pytest.raises(
        ValueError, match=r"kernels must be one of \('auto', 'xla', 'cpu'\), got 'gpu'"
    ):
        resolve_kernels("gpu")


@pytest.mark.parametrize(
    "shape, k, strides, padding",
    [
        ((2, 8, 8, 3), 3, (1, 1), ((1, 1), (1, 1))),
        ((2, 8, 6, 4), 3, (2, 2), ((0, 1), (0, 1))),  # Downsample
        ((2, 7, 9, 4), 3, (2, 2), ((1, 1), (1, 1))),  # strides not dividing the size
        ((1, 5, 5, 2), 2, (1, 2), ((0, 1), (1, 0))),  # 2x2 kernels of upsample_conv
    ],
)
@pytest.mark.parametrize("kernels", FAMILIES)
def test_conv2d_value_and_gradients_equal_lax_autodiff(shape, k, strides, padding, kernels):
    """conv2d's hand-written backward pass ("cpu") equals autodiff of lax.conv_general_dilated."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], 5)), jnp.float32)

    def ref(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims)

    y, vjp = jax.vjp(lambda x, w: conv2d(x, w, strides, padding, kernels), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # Inside lax.scan (several training steps per call) too.
    scanned = jax.lax.scan(lambda c, _: (c, vjp(dy)), 0, None, length=1)[1]
    np.testing.assert_allclose(scanned[1][0], vjp_ref(dy)[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernels", FAMILIES)
def test_group_norm_gradients_match_float64_reference(kernels):
    """group_norm (with and without swish; "cpu": the hand-written backward) equals autodiff of the
    plain two-pass formula evaluated in float64."""
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
            fn = lambda *a, s=swish: group_norm(*a, 4, 1e-6, s, kernels=kernels)
            y, vjp = jax.vjp(fn, *args32)
            grads = vjp(jnp.asarray(dy, jnp.float32))
            np.testing.assert_allclose(y, y64, atol=2e-5)
            for got, want in zip(grads, grads64, strict=True):
                np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kernels", FAMILIES)
def test_upsample_conv_equals_conv_of_upsampled_image(kernels):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)

    def ref(x, w):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(up, w, (1, 1), "SAME", dimension_numbers=dims)

    y, vjp = jax.vjp(lambda x, w: upsample_conv(x, w, kernels), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert y.shape == (2, 6, 10, 6)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 8, 8, 16)])
def test_random_bits_equal_jax_random_bits(shape):
    """Both families give jax.random.bits bit for bit ("cpu": the fused threefry): typed and raw
    keys, under jit, and through the fallback for other key implementations."""
    for key in (jax.random.key(11), jax.random.PRNGKey(3), jax.random.key(5, impl="rbg")):
        expected = jax.random.bits(key, shape)
        for kernels in FAMILIES:
            np.testing.assert_array_equal(random_bits(key, shape, kernels=kernels), expected)
        jitted = jax.jit(random_bits, static_argnums=(1, 3))
        np.testing.assert_array_equal(jitted(key, shape, None, "cpu"), expected)


def test_fused_threefry_equals_jax_threefry_primitive():
    """cpu_kernels.threefry2x32 is JAX's threefry2x32 primitive for arbitrary counter pairs."""
    rng = np.random.default_rng(0)
    x1, x2 = (jnp.asarray(rng.integers(0, 2**32, (3, 50), np.uint32)) for _ in range(2))
    for key in (jax.random.key(0), jax.random.key(2**31 + 7)):
        data = jax.random.key_data(key)
        want = jex_random.threefry2x32_p.bind(data[0], data[1], x1, x2)
        got = cpu_kernels.threefry2x32(data, x1, x2)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def _bits_by_row_reference(key, shape, index):
    """xor of the words of threefry2x32(key, (index[b], e)), from jax.extend's public
    threefry_2x32 (which hashes the pairs (count[:n/2][i], count[n/2:][i]))."""
    data = jax.random.key_data(key)
    row = int(np.prod(shape[1:]))
    hi = np.repeat(np.asarray(index, np.uint32), row)
    lo = np.tile(np.arange(row, dtype=np.uint32), len(index))
    out = np.asarray(jex_random.threefry_2x32((data[0], data[1]), np.concatenate([hi, lo])))
    return (out[: hi.size] ^ out[hi.size :]).reshape(shape)


@pytest.mark.parametrize("shape", [(4, 5), (8, 3, 3, 2)])
def test_random_bits_by_example_index(shape):
    """Row b's bits are threefry2x32(key, (example_index[b], e)) xor-ed, identical in both
    families; the bits of a batch are the concatenation of the bits of its parts; row index 0
    gives jax.random.bits of one row; other key implementations fold the index into the key."""
    b = shape[0]
    index = jnp.arange(b, dtype=jnp.int32) * 3 + 5  # any global positions
    for key in (jax.random.key(11), jax.random.PRNGKey(3)):
        want = _bits_by_row_reference(key, shape, index)
        for kernels in FAMILIES:
            np.testing.assert_array_equal(random_bits(key, shape, index, kernels), want)
            half = b // 2
            parts = [
                random_bits(key, (half, *shape[1:]), index[:half], kernels),
                random_bits(key, (b - half, *shape[1:]), index[half:], kernels),
            ]
            np.testing.assert_array_equal(np.concatenate(parts), want)
        zero = random_bits(key, (1, *shape[1:]), jnp.zeros(1, jnp.int32))
        np.testing.assert_array_equal(zero[0], jax.random.bits(key, shape[1:]))
    rbg = jax.random.key(5, impl="rbg")
    want = np.stack([jax.random.bits(jax.random.fold_in(rbg, i), shape[1:]) for i in index])
    for kernels in FAMILIES:
        np.testing.assert_array_equal(random_bits(rbg, shape, index, kernels), want)
    with pytest.raises(ValueError, match=r"example_index must have shape \[B\]"):
        random_bits(jax.random.key(0), shape, index[:-1])


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_equals_bernoulli_mask_of_flax(rate):
    """ops.dropout(x, key, rate) is flax.linen.Dropout's computation for that key:
    select(bernoulli(key, 1 - rate), x / (1 - rate), 0), bit for bit (typed and raw keys), in
    both families."""
    # The shape of a random_bits test above: its eagerly compiled threefry ops are reused.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
    for key in (jax.random.key(3), jax.random.PRNGKey(4)):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        want = jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))
        for kernels in FAMILIES:
            np.testing.assert_array_equal(dropout(x, key, rate, kernels=kernels), want)


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
