"""The DDPM UNet (Ho et al. 2020) in Flax linen, with class, text and FiLM extensions.

Architecture (``diffusion_tf/models/unet.py`` of the original code):

- sinusoidal timestep embedding of width ``ch`` -> Dense(4ch) -> swish -> Dense(4ch) = ``temb``;
  with ``num_classes`` a learned label embedding (``num_classes + 1`` rows, the last one the
  "null" label for classifier-free guidance) is added to ``temb``;
- ``conv_in`` (3x3, ``ch``), then for each level ``i`` ``num_res_blocks`` residual blocks of
  width ``ch * ch_mult[i]`` (each followed by self-attention when the feature-map height is in
  ``attn_resolutions``) and a stride-2 convolution except at the last level;
- middle: residual block, attention, residual block;
- up path mirroring the down path with ``num_res_blocks + 1`` blocks per level, each taking the
  concatenation with a skip connection, and nearest-neighbour upsampling + 3x3 convolution;
- GroupNorm, swish, zero-initialised ``conv_out``.

Every residual block receives ``temb`` (additively, or as FiLM scale/shift). With
``context_dim`` every attention block is a latent-diffusion spatial transformer (self-attention,
cross-attention to ``context``, MLP). Up to parameter names and NCHW -> NHWC, the network equals
diffusers' ``UNet2DModel`` with the same configuration (``freq_shift=1``,
``flip_sin_to_cos=False``, ``downsample_padding=0``, ``norm_eps=1e-6``; in scale-shift mode
diffusers omits the middle attention's GroupNorm, which this model keeps, like improved-diffusion);
tests/test_unet.py checks this numerically. :func:`cifar10_ddpm` has 35,746,307 parameters.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.attention import AttnBlock, SpatialTransformer
from ddpm_jax.models.layers import (
    RESBLOCK_CONDITIONINGS,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    make_conv,
    make_dense,
    timestep_embedding,
)
from ddpm_jax.models.ops import KERNELS

Dtype = Any

# Ho et al. 2020, CIFAR-10 (35.7M parameters).
CIFAR10_DDPM = dict(
    ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)


class UNet(nn.Module):
    """DDPM UNet predicting a tensor shaped like its input (eps, x0 or v).

    Attributes:
      ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels, the time embedding
        has ``4 * ch``.
      ch_mult: per-level channel multipliers; ``len(ch_mult)`` levels, so H and W must be
        divisible by ``2 ** (len(ch_mult) - 1)``.
      num_res_blocks: residual blocks per level on the down path (``+ 1`` on the up path).
      attn_resolutions: feature-map heights at which attention blocks follow the residual blocks
        (e.g. ``(16,)`` for 32x32 inputs); the middle always has one.
      dropout: dropout rate inside residual blocks, active only when ``train=True``.
      out_channels: output channels; None means the input channel count.
      num_classes: number of class labels for class conditioning, or None. Labels are
        ``0 .. num_classes - 1``; label ``num_classes`` is the null (unconditional) label.
      context_dim: width D of the cross-attention context, or None for no context.
      num_heads: attention heads; must divide the channel count at every attention block.
      num_groups: GroupNorm groups; must divide ``ch`` and every ``ch * ch_mult[i]``.
      resblock_conditioning: one of :data:`~ddpm_jax.models.layers.RESBLOCK_CONDITIONINGS`:
        ``'additive'`` (DDPM) or ``'scale_shift'`` (improved-diffusion FiLM).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and the output
        is returned as float32.
      kernels: kernel family of every block, one of :data:`~ddpm_jax.models.ops.KERNELS`:
        ``"xla"`` (plain XLA ops, JAX's autodiff in forward and reverse mode: ``jax.jvp`` and
        ``jax.jacfwd`` work), ``"cpu"`` (the CPU-tuned custom VJPs, reverse mode only) or
        ``"auto"`` (``"cpu"`` on a CPU backend, else ``"xla"``). Parameters and results are the
        same under all three, so checkpoints move freely between them.

    Call args (``model.apply(variables, x, t, y=None, context=None, train=False,
    example_index=None, rngs=...)``):
      x: [B, H, W, C] float images (or latents), NHWC; with bound parameters C must equal the
        input channels of ``conv_in``.
      t: [B] int32 timesteps in [0, T) (float accepted, e.g. continuous time scaled to [0, T));
        a scalar is broadcast to [B].
      y: [B] int32 class labels in [0, num_classes], required iff ``num_classes`` is set; pass
        ``jnp.full((B,), num_classes)`` for the null label.
      context: [B, M, context_dim] float sequence, required iff ``context_dim`` is set.
      train: enables dropout (needs ``rngs={'dropout': key}`` when ``dropout > 0``).
      example_index: optional int32 [B], each row's position in the global batch. With it, the
        dropout mask of row ``b`` depends only on the 'dropout' key and ``example_index[b]``
        (:func:`ddpm_jax.models.ops.random_bits`): the same key on every device gives every
        example the same masks however the batch is split. None: ``flax.linen.Dropout``'s masks.

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float = 0.0
    out_channels: int | None = None
    num_classes: int | None = None
    context_dim: int | None = None
    num_heads: int = 1
    num_groups: int = 32
    resblock_conditioning: str = "additive"
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @property
    def null_label(self) -> int | None:
        """The label id of the null (unconditional) condition, or None for a model without labels.

        With ``num_classes`` set, the label embedding has ``num_classes + 1`` rows and the last
        one, id ``num_classes``, is the null label: classifier-free guidance contrasts
        ``y = labels`` with ``y = jnp.full((B,), model.null_label)``, and training drops labels to
        it. None when ``num_classes`` is None.
        """
        return self.num_classes

    def __post_init__(self):
        self._validate_config()
        super().__post_init__()

    def _validate_config(self) -> None:
        def positive_int(name, value):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNet: {name} must be a positive int, got {value!r}")

        positive_int("ch", self.ch)
        positive_int("num_res_blocks", self.num_res_blocks)
        positive_int("num_heads", self.num_heads)
        positive_int("num_groups", self.num_groups)
        if len(self.ch_mult) == 0:
            raise ValueError(f"UNet: ch_mult must be a non-empty sequence, got {self.ch_mult!r}")
        for m in self.ch_mult:
            positive_int(f"ch_mult entry (ch_mult={tuple(self.ch_mult)!r})", m)
        for r in self.attn_resolutions:
            positive_int(f"attn_resolutions entry ({tuple(self.attn_resolutions)!r})", r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("out_channels", "num_classes", "context_dim"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.resblock_conditioning not in RESBLOCK_CONDITIONINGS:
            raise ValueError(
                f"UNet: resblock_conditioning must be one of {RESBLOCK_CONDITIONINGS}, "
                f"got {self.resblock_conditioning!r}"
            )
        if self.kernels not in KERNELS:
            raise ValueError(f"UNet: kernels must be one of {KERNELS}, got {self.kernels!r}")
        widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})
        bad = [w for w in widths if w % self.num_groups != 0]
        if bad:
            raise ValueError(
                f"UNet: num_groups={self.num_groups} must divide every channel count "
                f"(ch={self.ch} and ch * ch_mult = {widths}); it does not divide {bad}"
            )

    def _validate_inputs(self, x, t, y, context, example_index):
        if x.ndim != 4:
            raise ValueError(f"UNet: x must have shape [B, H, W, C], got shape {x.shape}")
        b, h, w, _ = x.shape
        # With bound parameters: the channels conv_in was built for (NCHW is the usual mistake).
        conv_in = self.variables.get("params", {}).get("conv_in")
        if conv_in is not None and x.shape[-1] != conv_in["kernel"].shape[2]:
            raise ValueError(
                f"UNet: x has shape {x.shape}, i.e. {x.shape[-1]} channels, but conv_in takes "
                f"{conv_in['kernel'].shape[2]}: images are NHWC [B, H, W, C]; was an NCHW "
                f"[B, C, H, W] array passed?"
            )
        factor = 2 ** (len(self.ch_mult) - 1)
        if h % factor != 0 or w % factor != 0:
            raise ValueError(
                f"UNet: input resolution {h}x{w} must be divisible by 2 ** (len(ch_mult) - 1) = "
                f"{factor} (ch_mult={tuple(self.ch_mult)})"
            )
        if t.shape != (b,):
            raise ValueError(f"UNet: t must have shape [B] = ({b},) or (), got shape {t.shape}")
        if example_index is not None and (
            example_index.shape != (b,) or not jnp.issubdtype(example_index.dtype, jnp.integer)
        ):
            raise ValueError(
                f"UNet: example_index must be int [B] = ({b},), got {example_index.dtype} of "
                f"shape {example_index.shape}"
            )
        if self.num_classes is None and y is not None:
            raise ValueError("UNet: y was given but num_classes is None (model is unconditional)")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"UNet: num_classes={self.num_classes} requires y: [B] int labels; use the "
                    f"null label y = jnp.full((B,), {self.num_classes}) for unconditional output"
                )
            if y.shape != (b,) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(
                    f"UNet: y must be int [B] = ({b},), got {y.dtype} of shape {y.shape}"
                )
        if self.context_dim is None and context is not None:
            raise ValueError("UNet: context was given but context_dim is None")
        if self.context_dim is not None:
            if context is None or context.ndim != 3 or context.shape[0] != b:
                raise ValueError(
                    f"UNet: context_dim={self.context_dim} requires context: [B={b}, M, "
                    f"{self.context_dim}], got {None if context is None else context.shape}"
                )
            if context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"UNet: context last dim must be context_dim={self.context_dim}, got shape "
                    f"{context.shape}"
                )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        context: jax.Array | None = None,
        train: bool = False,
        example_index: jax.Array | None = None,
    ) -> jax.Array:
        x = jnp.asarray(x)
        t = jnp.asarray(t)
        if t.ndim == 0 and x.ndim == 4:
            t = jnp.broadcast_to(t, (x.shape[0],))
        y = None if y is None else jnp.asarray(y)
        example_index = None if example_index is None else jnp.asarray(example_index)
        self._validate_inputs(x, t, y, context, example_index)
        dt, kn = self.dtype, self.kernels
        levels = len(self.ch_mult)
        out_channels = self.out_channels or x.shape[-1]

        temb = timestep_embedding(t, self.ch)
        temb = make_dense(4 * self.ch, "temb_dense0", dt, kernels=kn)(temb)
        temb = make_dense(4 * self.ch, "temb_dense1", dt, kernels=kn)(nn.swish(temb))
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes + 1,
                4 * self.ch,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="label_emb",
            )
            temb = temb + label_emb(y)

        def res_block(h, out_ch, name):
            conditioning = self.resblock_conditioning
            block = ResBlock(out_ch, self.dropout, self.num_groups, conditioning, dt, kn, name=name)
            return block(h, temb, train, example_index)

        def attn_block(h, name):
            if self.context_dim is None:
                return AttnBlock(self.num_heads, self.num_groups, dt, kn, name=name)(h)
            block = SpatialTransformer(self.num_heads, self.num_groups, dt, kn, name=name)
            return block(h, context)

        hs = [make_conv(self.ch, "conv_in", dt, kernels=kn)(x.astype(dt))]
        for i in range(levels):
            for j in range(self.num_res_blocks):
                h = res_block(hs[-1], self.ch * self.ch_mult[i], f"down_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"down_{i}_attn_{j}")
                hs.append(h)
            if i != levels - 1:
                hs.append(Downsample(dt, kn, name=f"down_{i}_downsample")(hs[-1]))

        h = res_block(hs[-1], hs[-1].shape[-1], "mid_block_1")
        h = attn_block(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_block_2")

        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res_block(h, self.ch * self.ch_mult[i], f"up_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"up_{i}_attn_{j}")
            if i != 0:
                h = Upsample(dt, kn, name=f"up_{i}_upsample")(h)
        assert not hs, "every skip connection is consumed"

        h = GroupNorm(self.num_groups, swish=True, dtype=dt, kernels=kn, name="norm_out")(h)
        zeros = nn.initializers.zeros
        h = make_conv(out_channels, "conv_out", dt, kernel_init=zeros, kernels=kn)(h)
        return h.astype(jnp.float32)


def cifar10_ddpm(**overrides: Any) -> UNet:
    """The CIFAR-10 UNet of Ho et al. 2020 (35,746,307 parameters for 3-channel 32x32 inputs).

    Args:
      **overrides: UNet attributes replacing those of :data:`CIFAR10_DDPM`
        (e.g. ``dtype=jnp.bfloat16`` or ``num_classes=10``).

    Returns:
      An (unbound) :class:`UNet`.
    """
    return UNet(**{**CIFAR10_DDPM, **overrides})
