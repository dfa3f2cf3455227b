"""Text conditioning for latent diffusion: a word-level tokenizer and a small transformer encoder.

The encoder turns prompts into a context sequence ``[B, L, D]`` for the UNet's cross-attention
and is trained jointly with the UNet (Rombach et al. 2022 train a transformer text encoder
end-to-end for their LAION text-to-image model in the same way).

Null condition (classifier-free guidance). The empty prompt ``""`` encodes to ``L`` padding
tokens. Inside the encoder every position attends to the non-padding positions *and to itself*,
so for the empty prompt each position attends only to itself and its output is a fixed function
of the (learned) padding embedding and the (learned) positional embedding of that position: the
null context is one learned ``[L, D]`` sequence, the same for every empty prompt in any batch,
and it is trained whenever prompts are dropped (:func:`drop_prompts`, probability
``p_uncond``). For a non-empty prompt the outputs at its word positions do not depend on the
padding positions; the padding positions carry learned summaries of the prompt. The context is
therefore meant to be cross-attended in full, padding positions included (as Stable Diffusion
does with CLIP's output): no key mask is needed in the UNet, and none may remove every position.

Prompts as labels. :class:`PromptUNet` conditions a UNet on one of P fixed prompts addressed by an
integer id ``y``: row ``y`` of a constant token table (:func:`prompt_table`; row P is the empty
prompt, the null condition) is encoded by a jointly trained :class:`TextEncoder` and cross-attended
by the UNet. Because the prompt is an integer id, the training engine's label dropout
(``y -> null_label`` with probability ``p_uncond``) *is* prompt dropout, and classifier-free
guidance with ``null_label`` is guidance against the empty prompt. Prompts outside the table are
encoded through :meth:`PromptUNet.from_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.unet import UNet

PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = ("<pad>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and return its words (runs of ``[a-z0-9]``); punctuation is dropped."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Word-level tokenizer with a fixed length: id 0 is padding, id 1 unknown words.

    Args:
        words: vocabulary words (each a run of ``[a-z0-9]``, no duplicates); they get ids
            ``2, 3, ...`` in the given order.
        max_length: number of tokens ``L`` of every encoded prompt.

    Example:
        >>> tok = Tokenizer.from_prompts(["a photo of a cat", "a photo of a dog"], max_length=8)
        >>> tokens, mask = tok.encode(["A photo of a cat!", ""])  # int32 [2, 8], bool [2, 8]
        >>> tok.decode(tokens)
        ['a photo of a cat', '']
    """

    def __init__(self, words: Sequence[str], max_length: int):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: must be a positive integer")
        words = tuple(words)
        if isinstance(words, str) or len(set(words)) != len(words):
            raise ValueError("words: must be a sequence of distinct words")
        for word in words:
            if not isinstance(word, str) or not _WORD.fullmatch(word):
                raise ValueError(f"words: {word!r} is not a word of [a-z0-9]+")
        self.vocab: tuple[str, ...] = SPECIAL_TOKENS + words
        self.max_length = max_length
        self._ids = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], max_length: int) -> Tokenizer:
        """Tokenizer whose vocabulary is the sorted set of words in ``prompts`` (deterministic)."""
        _check_prompts(prompts)
        return cls(sorted({w for p in prompts for w in split_words(p)}), max_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, padding and unknown included."""
        return len(self.vocab)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode prompts to fixed-length token ids.

        Args:
            prompts: B strings; words outside the vocabulary become ``UNK_ID``.

        Returns:
            tokens: [B, max_length] int32, words first, then ``PAD_ID``.
            mask: [B, max_length] bool, True at word positions (all False for ``""``).

        Raises:
            ValueError: a prompt has more than ``max_length`` words (naming it).
        """
        _check_prompts(prompts)
        tokens = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
        for b, prompt in enumerate(prompts):
            ids = [self._ids.get(w, UNK_ID) for w in split_words(prompt)]
            if len(ids) > self.max_length:
                raise ValueError(
                    f"prompts[{b}]={prompt!r}: {len(ids)} words, more than "
                    f"max_length={self.max_length}"
                )
            tokens[b, : len(ids)] = ids
        return tokens, tokens != PAD_ID

    def decode(self, tokens: np.ndarray | jax.Array) -> list[str]:
        """Token ids [B, L] → B strings of space-separated words (padding skipped)."""
        tokens = np.asarray(tokens)
        return [" ".join(self.vocab[i] for i in row if i != PAD_ID) for row in tokens]


def _check_prompts(prompts) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")


def drop_prompts(key: jax.Array, tokens: jax.Array, p_uncond: float | jax.Array) -> jax.Array:
    """Replace each example's tokens by the empty prompt (all ``PAD_ID``) with probability p.

    Used during training for classifier-free guidance (Ho & Salimans 2022): the same network
    learns the conditional and the null-conditioned model.

    Args:
        key: PRNG key; one independent Bernoulli draw per example.
        tokens: [B, L] int32 token ids.
        p_uncond: probability in [0, 1] of dropping an example's prompt.

    Returns:
        [B, L] int32: dropped rows all ``PAD_ID``, other rows unchanged.
    """
    if isinstance(p_uncond, int | float) and not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond={p_uncond!r}: must be in [0, 1]")
    drop = jax.random.uniform(key, (tokens.shape[0],)) < p_uncond
    return jnp.where(drop[:, None], jnp.asarray(PAD_ID, tokens.dtype), tokens)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    width: int
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
        """x: [B, L, width], attn_mask: [B, 1, L, L] bool (True = may attend) → [B, L, width]."""
        h = nn.LayerNorm(name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(self.num_heads, qkv_features=self.width, name="attn")(
            h, h, mask=attn_mask
        )
        x = x + h
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(self.mlp_ratio * self.width, name="mlp_in")(h)
        h = nn.Dense(self.width, name="mlp_out")(nn.gelu(h))
        return x + h


class TextEncoder(nn.Module):
    """Token + learned positional embedding, pre-LN transformer blocks, final LayerNorm.

    Attributes:
        vocab_size: number of token ids (``Tokenizer.vocab_size``).
        max_length: maximum sequence length L (size of the positional embedding).
        width: model and context width D.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``width``.
        mlp_ratio: hidden width of the MLP as a multiple of ``width``.

    Example:
        >>> enc = TextEncoder(vocab_size=tok.vocab_size, max_length=8, width=64, depth=2,
        ...                   num_heads=4)
        >>> params = enc.init(jax.random.key(0), tokens)
        >>> context = enc.apply(params, tokens)  # [B, 8, 64]
    """

    vocab_size: int
    max_length: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Encode token ids to a context sequence.

        Args:
            tokens: [B, L] int32 ids in [0, vocab_size), L <= max_length.
            mask: [B, L] bool, True at word positions; defaults to ``tokens != PAD_ID``.

        Returns:
            context: [B, L, width] float32 (see the module docstring for the null condition).
        """
        for name, value, low in [
            ("vocab_size", self.vocab_size, 1),
            ("max_length", self.max_length, 1),
            ("width", self.width, 1),
            ("depth", self.depth, 0),
            ("num_heads", self.num_heads, 1),
            ("mlp_ratio", self.mlp_ratio, 1),
        ]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads}: must divide width={self.width}")
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(
                f"tokens: expected [B, L] with L <= max_length={self.max_length}, "
                f"got shape {tokens.shape}"
            )
        length = tokens.shape[1]
        if mask is None:
            mask = tokens != PAD_ID
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embed")(tokens)
        pos = self.param("pos_embed", init, (self.max_length, self.width))
        x = x + pos[:length]
        # Queries attend to word positions and to themselves (so an all-padding row is defined).
        attn_mask = mask[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
        for i in range(self.depth):
            x = TransformerBlock(self.width, self.num_heads, self.mlp_ratio, name=f"blocks_{i}")(
                x, attn_mask
            )
        return nn.LayerNorm(name="ln_final")(x)


def prompt_table(tokenizer: Tokenizer, prompts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The constant token table of :class:`PromptUNet`: ``prompts`` then the empty prompt.

    Args:
      tokenizer: encodes each prompt to ``tokenizer.max_length`` ids.
      prompts: P non-empty prompts (ids ``0 .. P-1``).

    Returns:
      P + 1 rows of ``max_length`` ints; row P is all ``PAD_ID``.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    tokens, mask = tokenizer.encode(prompts + [""])
    empty = [p for p, m in zip(prompts, mask[:-1], strict=True) if not m.any()]
    if empty:
        raise ValueError(
            f"prompts: {empty} encode to the empty prompt, which is the null condition"
        )
    return tuple(tuple(int(v) for v in row) for row in tokens)


class PromptUNet(nn.Module):
    """A UNet conditioned on prompts addressed by id: ``y`` → tokens → TextEncoder → context.

    Attributes:
      unet: the denoiser; ``context_dim`` must equal ``text.width`` and ``num_classes`` be None.
      text: the text encoder, trained jointly with the UNet.
      prompt_tokens: the constant token table, a tuple of P + 1 rows of L ints; the last row must
        be all ``PAD_ID`` (the empty prompt = the null condition). Build it with
        :func:`prompt_table`.

    Call args (``apply(variables, x, t, y, train=False, example_index=None, rngs=...)``, the
    UNet's interface with a prompt id in place of a class label):
      x: [B, h, w, c] float32 latents.
      t: [B] int32 timesteps in [0, T).
      y: [B] int32 prompt ids in [0, P]; P (= ``null_label``) is the empty prompt.
      train: enables the UNet's dropout.
      example_index: optional int32 [B] global batch positions keying the UNet's dropout masks
        (see :class:`~ddpm_jax.models.unet.UNet`).

    Returns:
      [B, h, w, c] float32 prediction.
    """

    unet: UNet
    text: TextEncoder
    prompt_tokens: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        rows = self.prompt_tokens
        if len(rows) < 2 or len({len(r) for r in rows}) != 1:
            raise ValueError(
                "prompt_tokens: expected P + 1 >= 2 rows of equal length (use prompt_table)"
            )
        if any(v != PAD_ID for v in rows[-1]):
            raise ValueError("prompt_tokens: the last row must be the empty prompt (all PAD_ID)")
        if self.unet.num_classes is not None:
            raise ValueError("unet.num_classes must be None: prompts replace class labels")
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"unet.context_dim={self.unet.context_dim} must equal text.width={self.text.width}"
            )
        super().__post_init__()

    @property
    def num_prompts(self) -> int:
        """P, the number of prompts of the table (ids ``0 .. P-1``)."""
        return len(self.prompt_tokens) - 1

    @property
    def null_label(self) -> int:
        """The id of the empty prompt (the null condition of classifier-free guidance): P."""
        return self.num_prompts

    def tokens_of(self, y: jax.Array) -> jax.Array:
        """Prompt ids [B] in [0, P] → token rows [B, L] int32 (constants, not parameters)."""
        return jnp.asarray(np.asarray(self.prompt_tokens, np.int32))[y]

    def from_tokens(
        self,
        x: jax.Array,
        t: jax.Array,
        tokens: jax.Array,
        train: bool = False,
        example_index: jax.Array | None = None,
    ) -> jax.Array:
        """The prediction for arbitrary prompts given as tokens [B, L] (all PAD_ID = null)."""
        context = self.text(tokens)
        return self.unet(x, t, context=context, train=train, example_index=example_index)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        train: bool = False,
        example_index: jax.Array | None = None,
    ) -> jax.Array:
        tokens = self.tokens_of(jnp.asarray(y, jnp.int32))
        return self.from_tokens(x, t, tokens, train, example_index)
