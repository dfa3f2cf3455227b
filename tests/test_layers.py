"""Tests for ddpm_jax.models.layers: the Flax blocks.

Known answers: a float64 NumPy timestep embedding and group normalisation; the same dropout
masks and values as flax.linen.Dropout; masks keyed by the example index that split with the
batch; the "xla" and "cpu" kernel families giving the same outputs and gradients on the blocks of
the CIFAR-10 UNet. The blocks inside the whole network (identity at initialisation, diffusers'
``Transformer2DModel``) are checked in tests/test_unet.py.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from ddpm_jax.models.attention import AttnBlock, SpatialTransformer
from ddpm_jax.models.layers import (
    DTYPES,
    RESBLOCK_CONDITIONINGS,
    Downsample,
    Dropout,
    GroupNorm,
    ResBlock,
    Upsample,
    timestep_embedding,
)

# Compile time dominates these tests: XLA's LLVM optimisation level 0 halves it on CPU.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
FAMILIES = ("xla", "cpu")


def test_timestep_embedding_matches_float64_reference():
    t = np.array([0, 1, 17, 999], np.int32)
    for dim in (4, 32, 33):
        half = dim // 2
        ref = np.zeros((len(t), dim))
        for b, tb in enumerate(t):
            for i in range(half):
                freq = 10000.0 ** (-i / (half - 1))
                ref[b, i] = math.sin(tb * freq)
                ref[b, half + i] = math.cos(tb * freq)
        got = np.asarray(timestep_embedding(jnp.asarray(t), dim))
        assert got.shape == (len(t), dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 argument rounding at t=999
    # Float timesteps are accepted and interpolate smoothly.
    e = timestep_embedding(jnp.array([10.0, 10.5, 11.0]), 16)
    assert np.all(np.isfinite(e)) and not np.allclose(e[1], e[0]) and not np.allclose(e[1], e[2])
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(jnp.zeros(2), 3)


def test_group_norm_matches_float64_reference_even_with_large_offset():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 16)) * np.array([1.0, 3.0])[:, None, None, None]
    x = x + np.array([0.0, 1000.0])[:, None, None, None]  # E[x^2] - E[x]^2 would lose ~3%
    scale, bias = rng.standard_normal(16), rng.standard_normal(16)
    groups = x.reshape(2, 4, 4, 4, 4)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    ref = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    norm = GroupNorm(num_groups=4)
    params = {
        "params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    }
    got = norm.apply(params, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, ref, atol=2e-4)
    got16 = GroupNorm(4, dtype=jnp.bfloat16).apply(params, jnp.asarray(x, jnp.bfloat16)[:1])
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), ref[:1], atol=0.1)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_equals_flax_dropout(rate):
    """Same masks and values as flax.linen.Dropout given the same 'dropout' rng (so training
    results are unchanged), identity when deterministic, and about ``rate`` of zeros."""
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
    for seed in (0, 1):
        rngs = {"dropout": jax.random.key(seed)}
        ours = Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
        ref = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
        np.testing.assert_array_equal(ours, ref)
        assert abs(float(jnp.mean(ours == 0)) - rate) < 0.02
    np.testing.assert_array_equal(Dropout(rate).apply({}, x, deterministic=True), x)


def test_resblock_accepts_exactly_the_allowed_conditionings():
    x, temb = jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 16))
    assert RESBLOCK_CONDITIONINGS == ("additive", "scale_shift")
    for conditioning in RESBLOCK_CONDITIONINGS:
        block = ResBlock(16, num_groups=4, conditioning=conditioning)
        params = jax.eval_shape(block.init, jax.random.key(0), x, temb)
        width = 32 if conditioning == "scale_shift" else 16  # FiLM: scale and shift
        assert params["params"]["temb_proj"]["kernel"].shape == (16, width)
    with pytest.raises(ValueError, match=r"conditioning must be one of \('additive'"):
        jax.eval_shape(
            ResBlock(16, num_groups=4, conditioning="film").init, jax.random.key(0), x, temb
        )


def test_dtypes_name_the_compute_dtypes_and_params_stay_float32():
    assert DTYPES == {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    x = jnp.ones((1, 2, 2, 8))
    for dtype in DTYPES.values():
        norm = GroupNorm(4, dtype=dtype)
        params = jax.eval_shape(norm.init, jax.random.key(0), x)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        assert jax.eval_shape(norm.apply, params, x.astype(dtype)).dtype == dtype


def test_dropout_masks_keyed_by_example_index_split_with_the_batch():
    """With example_index, the masks of 8 rows are the masks of rows 0-3 (indices 0..3) and rows
    4-7 (indices 4..7) computed separately, as on two devices with the same 'dropout' key, and
    both kernel families draw the same masks."""
    x = jnp.ones((8, 4, 4, 16))
    rngs = {"dropout": jax.random.key(3)}
    index = jnp.arange(8, dtype=jnp.int32)
    masks = {}
    for kernels in FAMILIES:
        drop = _jit(lambda x, i, k=kernels: Dropout(0.5, k).apply({}, x, False, i, rngs=rngs) != 0)
        whole = drop(x, index)
        np.testing.assert_array_equal(
            whole, np.concatenate([drop(x[:4], index[:4]), drop(x[4:], index[4:])])
        )
        masks[kernels] = whole
        assert abs(float(jnp.mean(whole)) - 0.5) < 0.05
        assert not np.array_equal(whole[0], whole[1])  # rows differ
    np.testing.assert_array_equal(masks["xla"], masks["cpu"])


def _assert_close(got, want, rtol, name):
    """Leaf by leaf: ||got - want|| <= rtol * ||want||, with ||want|| floored at 1e-2 of the
    largest leaf norm: gradients that are zero in exact arithmetic (the attention key bias:
    softmax ignores a shift shared by all logits) are rounding noise in both families (measured
    ~2e-5 against leaf norms of ~1e3)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    norms = [float(np.linalg.norm(np.asarray(w, np.float64))) for w in want]
    floor = 1e-2 * max(norms)
    worst = 0.0
    for g, w, n in zip(got, want, norms, strict=True):
        diff = np.linalg.norm(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        worst = max(worst, diff / max(n, floor))
    assert worst <= rtol, (name, worst)
    return worst


def _family_results(make_block, args, kwargs, seed=0):
    """{family: (output, (d params, d args...))} of ``make_block(family)``, same parameters."""
    params = random_params(make_block("cpu"), *args, seed=seed, **kwargs)
    rng = np.random.default_rng(seed)
    results = {}
    for kernels in FAMILIES:
        block = make_block(kernels)
        fn = lambda p, *a, b=block: b.apply(p, *a, **kwargs, rngs={"dropout": jax.random.key(1)})

        @_jit
        def value_and_vjp(p, args, dy, fn=fn):
            y, vjp = jax.vjp(fn, p, *args)
            return y, vjp(dy)

        dy = jnp.asarray(rng.standard_normal(jax.eval_shape(fn, params, *args).shape), jnp.float32)
        results[kernels] = value_and_vjp(params, args, dy)
        rng = np.random.default_rng(seed)  # the same cotangent for both families
    return results


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# The blocks of the CIFAR-10 UNet (ch 128, ch_mult (1, 2, 2, 2), attention at 16x16), batch 2.
_CIFAR_BLOCKS = {
    "resblock_128_256_32x32_dropout": (
        lambda k: ResBlock(256, dropout=0.1, kernels=k),
        (_normal(0, 2, 32, 32, 128), _normal(1, 2, 512)),
        {"train": True},
    ),
    "resblock_256_16x16_scale_shift": (
        lambda k: ResBlock(256, conditioning="scale_shift", kernels=k),
        (_normal(2, 2, 16, 16, 256), _normal(3, 2, 512)),
        {},
    ),
    "attnblock_256_16x16": (lambda k: AttnBlock(kernels=k), (_normal(4, 2, 16, 16, 256),), {}),
    "upsample_256_16x16": (lambda k: Upsample(kernels=k), (_normal(5, 2, 16, 16, 256),), {}),
    "downsample_128_32x32": (lambda k: Downsample(kernels=k), (_normal(6, 2, 32, 32, 128),), {}),
    "groupnorm_swish_128_32x32": (
        lambda k: GroupNorm(32, swish=True, kernels=k),
        (_normal(7, 2, 32, 32, 128),),
        {},
    ),
    "spatial_transformer_64_8x8": (
        lambda k: SpatialTransformer(num_heads=2, num_groups=8, kernels=k),
        (_normal(8, 2, 8, 8, 64), _normal(9, 2, 5, 32)),
        {},
    ),
}


@pytest.mark.parametrize("name", list(_CIFAR_BLOCKS))
def test_xla_and_cpu_kernels_give_the_same_outputs_and_gradients(name):
    """The two kernel families agree to 1e-5 (relative) on each block's output and on the
    gradients of its parameters and inputs (dropout masks included: they are the same)."""
    make_block, args, kwargs = _CIFAR_BLOCKS[name]
    results = _family_results(make_block, args, kwargs)
    (y_xla, g_xla), (y_cpu, g_cpu) = results["xla"], results["cpu"]
    assert float(jnp.abs(y_cpu).max()) > 0
    _assert_close(y_xla, y_cpu, 1e-5, f"{name} output")
    _assert_close(g_xla, g_cpu, 1e-5, f"{name} gradients")


def test_blocks_reject_unknown_kernels():
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'xla', 'cpu'\)"):
        GroupNorm(4, kernels="gpu").init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))
