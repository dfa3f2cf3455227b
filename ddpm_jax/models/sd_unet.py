"""The Stable-Diffusion UNet (diffusers' ``UNet2DConditionModel`` of SD 1.x / 2.x) in Flax linen.

Architecture (Rombach et al. 2022, as diffusers builds it for ``CrossAttnDownBlock2D`` /
``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D`` / ``UpBlock2D``):

- sinusoidal timestep embedding of width ``block_out_channels[0]`` (``flip_sin_to_cos``: cosines
  first; ``freq_shift``: frequencies ``10000 ** (-i / (half - freq_shift))``) → Dense → swish →
  Dense = ``temb`` of width ``4 * block_out_channels[0]``;
- ``conv_in``; per level ``i`` ``layers_per_block[i]`` residual blocks (GroupNorm ε =
  ``norm_eps``; each followed by a spatial transformer when ``down_attention[i]``) and a stride-2
  convolution except at the last level;
- middle: residual block, spatial transformer, residual block;
- up path: per level (bottom first) ``layers_per_block + 1`` residual blocks on the
  concatenation with a skip connection (each followed by a transformer when
  ``up_attention[k]``), nearest-neighbour upsampling + 3x3 convolution except at the top;
- GroupNorm (``norm_eps``), swish, ``conv_out``.

The spatial transformers are :class:`~ddpm_jax.models.attention.SpatialTransformer` (GroupNorm ε
1e-6, ``proj_in``, self-attention, cross-attention to ``context``, GEGLU MLP, ``proj_out``; the
same function for diffusers' convolutional and linear ``proj_in/out``), with ``num_heads[i]``
heads at level ``i`` (the middle takes the last level's). Attention logits and softmax are always
float32 (what diffusers' ``upcast_attention`` asks for). Parameter and module names follow
diffusers' (``down_blocks_1_resnets_0/conv1``, ``mid_block_attentions_0``,
``up_blocks_3_upsamplers_0``) so that :mod:`ddpm_jax.weights.diffusers_sd_unet` maps them one
to one.

Like :class:`~ddpm_jax.models.unet.UNet`: parameters float32, computation in ``dtype``, output
float32, and ``kernels`` (one of :data:`~ddpm_jax.models.ops.KERNELS`) chooses the kernel family;
``"xla"`` is differentiable in forward mode (``jax.jvp``) too.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.attention import SpatialTransformer
from ddpm_jax.models.layers import GroupNorm, Upsample, make_conv, make_dense
from ddpm_jax.models.ops import KERNELS

Dtype = Any


def sinusoidal_embedding(
    t: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: ``[sin(t f_i), cos(t f_i)]`` (or cos first).

    ``f_i = max_period ** (-i / (half - freq_shift))`` for ``i < half = dim // 2``; an odd ``dim``
    gets one trailing zero column. Stable Diffusion uses ``flip_sin_to_cos=True``,
    ``freq_shift=0``.

    Args:
      t: [B] int or float timesteps.
      dim: embedding width, >= 2.
      flip_sin_to_cos: cosines first.
      freq_shift: subtracted from ``half`` in the frequency exponent.
      max_period: the longest period.

    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class SDResnet(nn.Module):
    """diffusers' ``ResnetBlock2D`` (default time conditioning, output scale 1).

    ``h = conv1(swish(norm1(x))) + time_emb_proj(swish(temb))``, ``h = conv2(swish(norm2(h)))``,
    returns ``conv_shortcut(x) + h`` (1x1 shortcut only when the channel count changes).

    Attributes:
      out_ch: output channels.
      num_groups: GroupNorm groups.
      epsilon: GroupNorm epsilon.
      dtype: compute dtype.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args:
      x: [B, H, W, C_in].
      temb: [B, E] time embedding (before the swish).

    Returns:
      [B, H, W, out_ch].
    """

    out_ch: int
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        dt, kn = self.dtype, self.kernels
        norm = lambda name: GroupNorm(self.num_groups, self.epsilon, True, dt, kn, name=name)
        h = make_conv(self.out_ch, "conv1", dt, kernels=kn)(norm("norm1")(x))
        h = (
            h
            + make_dense(self.out_ch, "time_emb_proj", dt, kernels=kn)(nn.swish(temb))[
                :, None, None, :
            ]
        )
        h = make_conv(self.out_ch, "conv2", dt, kernels=kn)(norm("norm2")(h))
        if x.shape[-1] != self.out_ch:
            x = make_conv(self.out_ch, "conv_shortcut", dt, kernel=1, kernels=kn)(x)
        return x.astype(dt) + h


class SDDownsample(nn.Module):
    """diffusers' ``Downsample2D``: a stride-2 3x3 convolution ``conv``; ``padding`` 1 pads every
    side, 0 pads one row / column at the end (diffusers' ``downsample_padding``)."""

    padding: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pads = ((p, p), (p, p)) if p else ((0, 1), (0, 1))
        return make_conv(x.shape[-1], "conv", self.dtype, 3, 2, pads, kernels=self.kernels)(x)


class SDUNet(nn.Module):
    """The text-conditioned Stable-Diffusion UNet predicting ε or v for latents.

    Attributes:
      block_out_channels: width of each level (SD: ``(320, 640, 1280, 1280)``).
      layers_per_block: residual blocks per level on the down path (``+ 1`` on the up path).
      down_attention: per level, whether its blocks have spatial transformers
        (``CrossAttnDownBlock2D``); SD: ``(True, True, True, False)``.
      up_attention: per up level, bottom first (``CrossAttnUpBlock2D``); SD:
        ``(False, True, True, True)``.
      num_heads: attention heads per level (down order; the up path takes them reversed, the
        middle the last); each must divide its level's width.
      context_dim: width D of the cross-attention context (SD 1.x: 768, 2.x: 1024).
      out_channels: output channels; None means the input channel count.
      num_groups: GroupNorm groups of every block.
      norm_eps: GroupNorm epsilon of the residual blocks and of the output norm.
      flip_sin_to_cos: time embedding with cosines first.
      freq_shift: the time embedding's frequency shift.
      downsample_padding: 1 (pad every side) or 0 (one row / column at the end).
      dtype: compute dtype; parameters are float32, the output is float32.
      kernels: kernel family, one of :data:`~ddpm_jax.models.ops.KERNELS`.

    Call args (``model.apply(variables, x, t, context)``):
      x: [B, H, W, C] latents, NHWC; H and W divisible by ``2 ** (levels - 1)``.
      t: [B] int32 timesteps in [0, T) (float accepted; a scalar is broadcast).
      context: [B, M, context_dim] text-encoder states.

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """

    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: Sequence[int] = (2, 2, 2, 2)
    down_attention: Sequence[bool] = (True, True, True, False)
    up_attention: Sequence[bool] = (False, True, True, True)
    num_heads: Sequence[int] = (8, 8, 8, 8)
    context_dim: int = 768
    out_channels: int | None = None
    num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("layers_per_block", "down_attention", "up_attention", "num_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"SDUNet: {name} has {len(getattr(self, name))} entries, "
                    f"block_out_channels {levels}"
                )
        for w, heads in zip(self.block_out_channels, self.num_heads, strict=True):
            if w % heads or w % self.num_groups:
                raise ValueError(
                    f"SDUNet: width {w} must be divisible by its heads ({heads}) and by "
                    f"num_groups={self.num_groups}"
                )
        if self.downsample_padding not in (0, 1):
            raise ValueError(
                f"SDUNet: downsample_padding must be 0 or 1, got {self.downsample_padding}"
            )
        if self.kernels not in KERNELS:
            raise ValueError(f"SDUNet: kernels must be one of {KERNELS}, got {self.kernels!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        x, t, context = jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)
        if x.ndim != 4 or context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(
                f"SDUNet: x must be [B, H, W, C] and context [B, M, D], got {x.shape} and "
                f"{context.shape}"
            )
        if t.ndim == 0:
            t = jnp.broadcast_to(t, x.shape[:1])
        levels = len(self.block_out_channels)
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor or t.shape != x.shape[:1]:
            raise ValueError(
                f"SDUNet: x {x.shape} needs H and W divisible by {factor}, t shape [B], got "
                f"{t.shape}"
            )
        dt, kn, widths = self.dtype, self.kernels, self.block_out_channels
        ch = widths[0]
        temb = sinusoidal_embedding(t, ch, self.flip_sin_to_cos, self.freq_shift)
        temb = make_dense(4 * ch, "time_embedding_linear_1", dt, kernels=kn)(temb)
        temb = make_dense(4 * ch, "time_embedding_linear_2", dt, kernels=kn)(nn.swish(temb))

        def resnet(h, out_ch, name):
            return SDResnet(out_ch, self.num_groups, self.norm_eps, dt, kn, name=name)(h, temb)

        def transformer(h, heads, name):
            return SpatialTransformer(heads, self.num_groups, dt, kn, name=name)(h, context)

        hs = [make_conv(ch, "conv_in", dt, kernels=kn)(x.astype(dt))]
        for i in range(levels):
            for j in range(self.layers_per_block[i]):
                h = resnet(hs[-1], widths[i], f"down_blocks_{i}_resnets_{j}")
                if self.down_attention[i]:
                    h = transformer(h, self.num_heads[i], f"down_blocks_{i}_attentions_{j}")
                hs.append(h)
            if i != levels - 1:
                name = f"down_blocks_{i}_downsamplers_0"
                hs.append(SDDownsample(self.downsample_padding, dt, kn, name=name)(hs[-1]))

        h = resnet(hs[-1], widths[-1], "mid_block_resnets_0")
        h = transformer(h, self.num_heads[-1], "mid_block_attentions_0")
        h = resnet(h, widths[-1], "mid_block_resnets_1")

        for k in range(levels):
            i = levels - 1 - k  # the level this up block mirrors
            for j in range(self.layers_per_block[i] + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet(h, widths[i], f"up_blocks_{k}_resnets_{j}")
                if self.up_attention[k]:
                    h = transformer(h, self.num_heads[i], f"up_blocks_{k}_attentions_{j}")
            if k != levels - 1:
                h = Upsample(dt, kn, name=f"up_blocks_{k}_upsamplers_0")(h)
        assert not hs, "every skip connection is consumed"

        h = GroupNorm(self.num_groups, self.norm_eps, True, dt, kn, name="conv_norm_out")(h)
        out_channels = self.out_channels or x.shape[-1]
        return make_conv(out_channels, "conv_out", dt, kernels=kn)(h).astype(jnp.float32)
