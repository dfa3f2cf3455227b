"""CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion, in Flax.

Token embedding + learned positional embedding, ``num_layers`` pre-LayerNorm transformer layers
with causal self-attention (position ``i`` attends to ``0 .. i``) and an MLP of width
``intermediate_size`` (``quick_gelu`` ``x * sigmoid(1.702 x)`` as in CLIP and SD 1.x, or ``gelu``
as in OpenCLIP's ViT-H of SD 2.x), then a final LayerNorm: the ``last_hidden_state`` of
transformers' ``CLIPTextModel``, which Stable Diffusion cross-attends. SD 2.x takes the
penultimate layer of OpenCLIP by configuring ``num_hidden_layers = 23`` of 24, followed by the
final LayerNorm; that is simply ``num_layers=23`` here.

Module names follow transformers' (``layers_3/self_attn/q_proj``, ``final_layer_norm``) so that
:mod:`ddpm_jax.weights.clip_weights` maps them one to one. Parameters are float32, computation
is in ``dtype`` (LayerNorm statistics and attention softmax in float32), the output float32;
``kernels`` (one of :data:`~ddpm_jax.models.ops.KERNELS`) chooses the kernel family of the dense
layers.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import make_dense

Dtype = Any

# transformers' ACT2FN names this encoder computes.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: ``out_proj(attention(q_proj(x), k_proj(x), v_proj(x)))``
    with position ``i`` attending to ``0 .. i`` (scale ``1 / sqrt(head width)``, biases on all
    four projections; logits and softmax in float32)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, d = x.shape
        heads = (b, length, self.num_heads, d // self.num_heads)
        dense = lambda name: make_dense(d, name, self.dtype, kernels=self.kernels)
        q, k, v = (dense(name)(x).reshape(heads) for name in ("q_proj", "k_proj", "v_proj"))
        return dense("out_proj")(
            jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, length, d)
        )


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``act`` one of :data:`ACTIVATIONS`."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = make_dense(self.intermediate_size, "fc1", self.dtype, kernels=self.kernels)(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return make_dense(x.shape[-1], "fc2", self.dtype, kernels=self.kernels)(h)


class CLIPEncoderLayer(nn.Module):
    """``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))`` (pre-LayerNorm).

    Attributes:
      num_heads: attention heads; must divide the width.
      intermediate_size: MLP width.
      hidden_act: one of :data:`ACTIVATIONS`.
      layer_norm_eps: LayerNorm epsilon.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, L, D].

    Returns:
      [B, L, D].
    """

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, kn = self.dtype, self.kernels
        norm = lambda name: nn.LayerNorm(
            self.layer_norm_eps, dtype=dt, param_dtype=jnp.float32, name=name
        )
        x = x.astype(dt)
        x = x + CLIPAttention(self.num_heads, dt, kn, name="self_attn")(norm("layer_norm1")(x))
        mlp = CLIPMLP(self.intermediate_size, self.hidden_act, dt, kn, name="mlp")
        return x + mlp(norm("layer_norm2")(x))


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder: token ids → ``last_hidden_state`` (after the final LayerNorm).

    Attributes:
      vocab_size: number of token ids.
      hidden_size: width D (SD 1.x: 768, SD 2.x: 1024).
      intermediate_size: MLP width.
      num_layers: transformer layers (``num_hidden_layers``).
      num_heads: attention heads; must divide ``hidden_size``.
      max_position_embeddings: rows of the positional embedding, the longest sequence (77).
      hidden_act: one of :data:`ACTIVATIONS` (``"quick_gelu"`` or ``"gelu"`` in SD).
      layer_norm_eps: LayerNorm epsilon.
      dtype: compute dtype; parameters are float32, the output float32.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args (``model.apply(variables, tokens)``):
      tokens: [B, L] int32 ids, L <= ``max_position_embeddings`` (a CLIP tokenizer's output).

    Returns:
      [B, L, hidden_size] float32, the context of the SD UNet's cross-attention.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextTransformer: hidden_act={self.hidden_act!r}: must be one of "
                f"{tuple(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CLIPTextTransformer: num_heads={self.num_heads} must divide hidden_size="
                f"{self.hidden_size}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"CLIPTextTransformer: tokens must be [B, L] with L <= "
                f"{self.max_position_embeddings}, got shape {tokens.shape}"
            )
        embed = lambda n, name: nn.Embed(
            n, self.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32, name=name
        )
        x = embed(self.vocab_size, "token_embedding")(tokens)
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = x + embed(self.max_position_embeddings, "position_embedding")(positions)
        for i in range(self.num_layers):
            layer = CLIPEncoderLayer(
                self.num_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                self.dtype,
                self.kernels,
                name=f"layers_{i}",
            )
            x = layer(x.astype(self.dtype))
        final = nn.LayerNorm(
            self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name="final_layer_norm"
        )
        return final(x).astype(jnp.float32)
