"""Tests for ddpm_jax.models.layers: the Flax blocks.

Known answers: a float64 NumPy timestep embedding and group normalisation; the same dropout
masks and values as flax.linen.Dropout. The blocks inside the whole network (identity at
initialisation, diffusers' ``Transformer2DModel``) are checked in tests/test_unet.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.layers import (
    DTYPES,
    RESBLOCK_CONDITIONINGS,
    Dropout,
    GroupNorm,
    ResBlock,
    timestep_embedding,
)


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
