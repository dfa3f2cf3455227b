"""Attention blocks of the diffusion networks (Flax linen, NHWC): DDPM's self-attention and the
latent-diffusion spatial transformer with cross-attention to a context.

Parameters are float32 and computation is in ``dtype``; logits and softmax are float32
(:func:`ddpm_jax.models.ops.attention`); ``kernels`` (one of
:data:`~ddpm_jax.models.ops.KERNELS`) chooses the kernel family of the normalisations and
projections. ``proj_out`` of every block starts at exactly zero, so
each block is the identity at initialisation (Ho et al. 2020).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import DenseParams, GroupNorm, make_dense, zeros_init
from ddpm_jax.models.ops import attention, pointwise

Dtype = Any


class AttnBlock(nn.Module):
    """DDPM self-attention block over all H * W positions, with a residual connection.

    ``x + proj_out(attention(q, k, v))`` with ``q, k, v`` linear maps of ``norm(x)``; each of the
    ``num_heads`` heads has width ``C / num_heads`` (DDPM uses one head). ``proj_out`` starts at
    zero.

    Attributes:
      num_heads: attention heads; must divide C.
      num_groups: GroupNorm groups.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C] features.

    Returns:
      [B, H, W, C] features.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        if c % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the channel count {c} of the "
                f"attention block '{self.name}'"
            )
        kn = self.kernels
        h = GroupNorm(self.num_groups, dtype=self.dtype, kernels=kn, name="norm")(x)
        heads = (b, hh * ww, self.num_heads, c // self.num_heads)
        # q, k and v as one matmul with the three kernels side by side.
        qkv_params = [DenseParams(c, name=n)(c) for n in ("q", "k", "v")]
        kernel = jnp.concatenate([w for w, _ in qkv_params], axis=1).astype(self.dtype)
        bias = jnp.concatenate([beta for _, beta in qkv_params]).astype(self.dtype)
        qkv = pointwise(h.astype(self.dtype), kernel, kn) + bias
        q, k, v = (a.reshape(heads) for a in jnp.split(qkv, 3, axis=-1))
        h = attention(q, k, v).reshape(b, hh, ww, c)
        h = make_dense(c, "proj_out", self.dtype, kernel_init=zeros_init, kernels=kn)(h)
        return x.astype(self.dtype) + h


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (self-attention when ``context`` is None).

    Latent-diffusion layout: bias-free ``to_q``/``to_k``/``to_v``, ``to_out`` with bias.

    Attributes:
      num_heads: heads; must divide the width C of ``x``.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, L, C] queries.
      context: [B, M, D] keys/values, or None for self-attention.

    Returns:
      [B, L, C].
    """

    num_heads: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, length, c = x.shape
        context = x if context is None else context
        head = c // self.num_heads
        dense = lambda name, bias=True: make_dense(c, name, self.dtype, bias, kernels=self.kernels)
        q = dense("to_q", False)(x)
        k = dense("to_k", False)(context)
        v = dense("to_v", False)(context)
        q = q.reshape(b, length, self.num_heads, head)
        k = k.reshape(b, context.shape[1], self.num_heads, head)
        v = v.reshape(b, context.shape[1], self.num_heads, head)
        h = attention(q, k, v).reshape(b, length, c)
        return dense("to_out")(h)


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
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C] features.
      context: [B, M, D] conditioning sequence (e.g. text-encoder states).

    Returns:
      [B, H, W, C] features.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

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

        dt, kn = self.dtype, self.kernels
        h = GroupNorm(self.num_groups, dtype=dt, kernels=kn, name="norm")(x)
        u = make_dense(c, "proj_in", dt, kernels=kn)(h).reshape(b, hh * ww, c)
        attn = lambda name: CrossAttention(self.num_heads, dt, kn, name=name)
        u = u + attn("attn1")(layer_norm("norm1")(u))
        u = u + attn("attn2")(layer_norm("norm2")(u), context.astype(self.dtype))
        value, gate = jnp.split(
            make_dense(8 * c, "ff_in", dt, kernels=kn)(layer_norm("norm3")(u)), 2, -1
        )
        u = u + make_dense(c, "ff_out", dt, kernels=kn)(value * nn.gelu(gate, approximate=False))
        out = make_dense(c, "proj_out", dt, kernel_init=zeros_init, kernels=kn)
        h = out(u.reshape(b, hh, ww, c))
        return x.astype(self.dtype) + h
