"""Tests for ddpm_jax.models.text: tokenizer, transformer text encoder, prompt dropping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from ddpm_jax.models.text import PAD_ID, UNK_ID, TextEncoder, Tokenizer, drop_prompts

PROMPTS = ["a photo of a cat", "A photo of a dog.", "a blurry photo of a truck", "an airplane"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_prompts(PROMPTS, max_length=8)


@pytest.fixture(scope="module")
def encoder_and_params(tokenizer):
    enc = TextEncoder(tokenizer.vocab_size, max_length=8, width=32, depth=2, num_heads=4)
    tokens, _ = tokenizer.encode(PROMPTS)
    return enc, random_params(enc, jnp.asarray(tokens))


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_vocabulary_is_deterministic_and_sorted():
    a = Tokenizer.from_prompts(PROMPTS, max_length=8)
    b = Tokenizer.from_prompts(list(reversed(PROMPTS)) + PROMPTS, max_length=8)
    assert a.vocab == b.vocab
    assert a.vocab[:2] == ("<pad>", "<unk>")
    assert list(a.vocab[2:]) == sorted(a.vocab[2:])
    assert set(a.vocab[2:]) == {
        "a",
        "photo",
        "of",
        "cat",
        "dog",
        "blurry",
        "truck",
        "an",
        "airplane",
    }


def test_encode_decode_round_trip(tokenizer):
    tokens, mask = tokenizer.encode(PROMPTS)
    assert tokens.dtype == np.int32 and tokens.shape == (4, 8)
    assert mask.dtype == bool and np.array_equal(mask, tokens != PAD_ID)
    expected = ["a photo of a cat", "a photo of a dog", "a blurry photo of a truck", "an airplane"]
    assert tokenizer.decode(tokens) == expected
    # Words first, then padding; "a" is the same id wherever it occurs.
    np.testing.assert_array_equal(mask.sum(1), [5, 5, 6, 2])
    assert tokens[0, 0] == tokens[0, 3] == tokens[2, 0] == tokenizer.vocab.index("a")
    again, _ = tokenizer.encode(PROMPTS)
    np.testing.assert_array_equal(tokens, again)


def test_empty_prompt_is_all_padding_and_unknown_words_are_unk(tokenizer):
    tokens, mask = tokenizer.encode(["", "  ?! ", "a zebra"])
    np.testing.assert_array_equal(tokens[:2], PAD_ID)
    assert not mask[:2].any()
    np.testing.assert_array_equal(tokens[2, :2], [tokenizer.vocab.index("a"), UNK_ID])


def test_tokenizer_validation(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(["a " * 9])
    with pytest.raises(ValueError, match="prompts"):
        tokenizer.encode("a cat")
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(["cat"], max_length=0)
    with pytest.raises(ValueError, match="words"):
        Tokenizer(["cat", "cat"], max_length=4)
    with pytest.raises(ValueError, match="words"):
        Tokenizer(["Cat!"], max_length=4)


# ------------------------------------------------------------------------------------ encoder


def _layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference_encoder(params, tokens, mask, depth):
    """Independent float64 NumPy implementation of TextEncoder."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    length = tokens.shape[1]
    x = p["token_embed"]["embedding"][tokens] + p["pos_embed"][:length]
    allowed = mask[:, None, :] | np.eye(length, dtype=bool)[None]  # [B, Lq, Lk]
    for i in range(depth):
        blk = p[f"blocks_{i}"]
        h = _layer_norm(x, blk["ln_attn"])
        a = blk["attn"]
        q = np.einsum("bld,dhk->blhk", h, a["query"]["kernel"]) + a["query"]["bias"]
        k = np.einsum("bld,dhk->blhk", h, a["key"]["kernel"]) + a["key"]["bias"]
        v = np.einsum("bld,dhk->blhk", h, a["value"]["kernel"]) + a["value"]["bias"]
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        logits = np.where(allowed[:, None], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a["out"]["kernel"]) + a["out"]["bias"]
        h = _layer_norm(x, blk["ln_mlp"])
        h = _gelu_tanh(h @ blk["mlp_in"]["kernel"] + blk["mlp_in"]["bias"])
        x = x + h @ blk["mlp_out"]["kernel"] + blk["mlp_out"]["bias"]
    return _layer_norm(x, p["ln_final"])


def test_encoder_matches_numpy_reference(tokenizer, encoder_and_params):
    enc, params = encoder_and_params
    tokens, mask = tokenizer.encode(PROMPTS + [""])
    context = enc.apply(params, jnp.asarray(tokens))
    assert context.shape == (5, 8, 32) and context.dtype == jnp.float32
    ref = _reference_encoder(params, tokens, mask, depth=2)
    np.testing.assert_allclose(np.asarray(context), ref, rtol=2e-4, atol=2e-4)


def test_changing_the_prompt_changes_the_context(tokenizer, encoder_and_params):
    enc, params = encoder_and_params
    tokens, mask = tokenizer.encode(["a photo of a cat", "a photo of a dog"])
    context = np.asarray(enc.apply(params, jnp.asarray(tokens)))
    # "cat" vs "dog" is the last word; through attention every word position changes.
    diff = np.abs(context[0] - context[1]).max(-1)
    assert (diff[mask[0]] > 1e-3).all()


def test_padding_does_not_change_word_outputs(tokenizer, encoder_and_params):
    enc, params = encoder_and_params
    tokens, mask = tokenizer.encode(PROMPTS)
    garbage = np.random.default_rng(0).integers(2, tokenizer.vocab_size, tokens.shape)
    noisy = np.where(mask, tokens, garbage).astype(np.int32)
    clean = np.asarray(enc.apply(params, jnp.asarray(tokens)))
    masked = np.asarray(enc.apply(params, jnp.asarray(noisy), jnp.asarray(mask)))
    np.testing.assert_allclose(masked[mask], clean[mask], rtol=1e-5, atol=1e-5)
    # Without the mask the garbage is attended to: the check above could fail.
    unmasked = np.asarray(enc.apply(params, jnp.asarray(noisy)))
    assert np.abs(unmasked[mask] - clean[mask]).max() > 1e-3
    # A shorter sequence (fewer padding positions) gives the same word outputs.
    short = np.asarray(enc.apply(params, jnp.asarray(tokens[:, :6])))
    np.testing.assert_allclose(short[mask[:, :6]], clean[:, :6][mask[:, :6]], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_null_context_is_well_defined_and_learnable(tokenizer, encoder_and_params):
    enc, params = encoder_and_params
    tokens, _ = tokenizer.encode(["", "a photo of a cat", "", "an airplane"])
    context = np.asarray(enc.apply(params, jnp.asarray(tokens)))
    assert np.isfinite(context).all()
    alone = np.asarray(enc.apply(params, jnp.asarray(tokens[:1])))[0]
    # Same null context in every row and whatever the rest of the batch holds.
    np.testing.assert_allclose(context[0], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(context[2], alone, rtol=1e-5, atol=1e-5)
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # positions differ (positional embedding)

    def null_energy(p):
        return jnp.sum(enc.apply(p, jnp.asarray(tokens[:1])) ** 2)

    grads = jax.grad(null_energy)(params)["params"]
    assert np.abs(np.asarray(grads["token_embed"]["embedding"][PAD_ID])).max() > 0
    assert np.abs(np.asarray(grads["pos_embed"])).max() > 0


def test_encoder_validation(tokenizer):
    tokens = jnp.zeros((2, 9), jnp.int32)
    enc = TextEncoder(tokenizer.vocab_size, max_length=8, width=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="max_length"):
        enc.init(jax.random.key(0), tokens)
    bad = TextEncoder(tokenizer.vocab_size, max_length=8, width=30, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        bad.init(jax.random.key(0), tokens[:, :8])


# ------------------------------------------------------------------------------------ dropping


def test_drop_prompts_drops_about_p_of_rows():
    batch, p = 4000, 0.3
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 50, (batch, 6)), jnp.int32)
    out = np.asarray(drop_prompts(jax.random.key(0), tokens, p))
    dropped = (out == PAD_ID).all(1)
    kept = ~dropped
    np.testing.assert_array_equal(out[kept], np.asarray(tokens)[kept])
    sigma = np.sqrt(p * (1 - p) / batch)
    assert abs(dropped.mean() - p) < 4 * sigma
    np.testing.assert_array_equal(out, np.asarray(drop_prompts(jax.random.key(0), tokens, p)))
    other = np.asarray(drop_prompts(jax.random.key(1), tokens, p))
    assert not np.array_equal(out, other)


def test_drop_prompts_edge_cases_and_jit():
    tokens = jnp.ones((16, 4), jnp.int32) * 3
    np.testing.assert_array_equal(drop_prompts(jax.random.key(0), tokens, 0.0), tokens)
    np.testing.assert_array_equal(drop_prompts(jax.random.key(0), tokens, 1.0), PAD_ID)
    jitted = jax.jit(drop_prompts)(jax.random.key(2), tokens, jnp.float32(0.5))
    np.testing.assert_array_equal(jitted, drop_prompts(jax.random.key(2), tokens, 0.5))
    with pytest.raises(ValueError, match="p_uncond"):
        drop_prompts(jax.random.key(0), tokens, 1.5)
