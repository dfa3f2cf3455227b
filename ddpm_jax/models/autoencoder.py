"""KL-regularised convolutional autoencoder (the latent-diffusion ``AutoencoderKL``).

The architecture mirrors ``diffusers.AutoencoderKL`` (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models") layer for layer and name for name, so that the
VAE of a Stable-Diffusion-style checkpoint in the diffusers layout loads into it
(:func:`ddpm_jax.weights.diffusers.load_diffusers_vae`):

* Encoder: ``conv_in`` → per level ``layers_per_block`` ResNet blocks and (except at the last
  level) a stride-2 3x3 convolution with asymmetric zero padding (0, 1, 0, 1) → mid block
  (ResNet, single-head spatial self-attention, ResNet) → GroupNorm + SiLU → ``conv_out`` to
  ``2 * latent_channels`` → 1x1 ``quant_conv``. The channels split into the posterior mean and
  log-variance (clipped to [-30, 20] as in LDM / diffusers).
* Decoder: 1x1 ``post_quant_conv`` → ``conv_in`` → mid block → per level (reversed)
  ``layers_per_block + 1`` ResNet blocks and (except at the last level) nearest-neighbour x2
  upsampling + 3x3 convolution → GroupNorm + SiLU → ``conv_out``.

Everything is NHWC; images are float32 in [-1, 1]. An image of size ``H x W`` maps to a latent of
size ``H / 2**(len(block_out_channels) - 1)``.

For latent diffusion the autoencoder is frozen and latents are multiplied by ``scaling_factor``
(diffusers' default 0.18215 for the SD VAE; for a VAE trained here use
:func:`estimate_scale_factor`, i.e. 1 / std of the latents, as in Rombach et al. Sec. 4.3.2)
so that the diffusion model sees latents of roughly unit variance.

Training helpers (reconstruction + KL loss, a small optax loop) live in
:mod:`ddpm_jax.latent.vae_train`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
_EPS = 1e-6  # GroupNorm epsilon used throughout diffusers' VAE.


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # Exact (two-pass) variance so that outputs match PyTorch's GroupNorm to float32 precision.
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, name=name)


def _conv3x3(features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without time embedding (GroupNorm-SiLU-conv twice, skip).

    Attributes:
        out_channels: output channels; a 1x1 ``conv_shortcut`` is used when they differ from the
            input channels.
        groups: GroupNorm groups.
    """

    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] → [B, H, W, out_channels]."""
        h = nn.silu(_group_norm(self.groups, "norm1")(x))
        h = _conv3x3(self.out_channels, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, "norm2")(h))
        h = _conv3x3(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (diffusers' VAE attention).

    Attributes:
        groups: GroupNorm groups of the input normalisation.
    """

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] → [B, H, W, C]."""
        b, height, width, c = x.shape
        h = _group_norm(self.groups, "group_norm")(x).reshape(b, height * width, c)
        q = nn.Dense(c, name="to_q")(h)
        k = nn.Dense(c, name="to_k")(h)
        v = nn.Dense(c, name="to_v")(h)
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(c), axis=-1)
        h = nn.Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + h.reshape(b, height, width, c)


class MidBlock(nn.Module):
    """ResNet → (optional) attention → ResNet at the lowest resolution."""

    channels: int
    groups: int
    add_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, channels] → [B, H, W, channels]."""
        x = ResnetBlock(self.channels, self.groups, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after zero padding (0, 1) on H and W, as in LDM / diffusers."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] → [B, H // 2, W // 2, channels] (H, W even)."""
        conv = nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="conv")
        return conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] → [B, 2H, 2W, channels]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv3x3(self.channels, "conv")(x)


class Encoder(nn.Module):
    """Image → ``2 * latent_channels`` moments (before ``quant_conv``)."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] → [B, H / 2**(n-1), W / 2**(n-1), 2 * latent_channels]."""
        chans = tuple(self.block_out_channels)
        h = _conv3x3(chans[0], "conv_in")(x)
        for i, ch in enumerate(chans):
            block = f"down_blocks_{i}"
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, self.groups, name=f"{block}_resnets_{j}")(h)
            if i != len(chans) - 1:
                h = Downsample(ch, name=f"{block}_downsamplers_0")(h)
        h = MidBlock(chans[-1], self.groups, self.mid_block_add_attention, name="mid_block")(h)
        h = nn.silu(_group_norm(self.groups, "conv_norm_out")(h))
        return _conv3x3(2 * self.latent_channels, "conv_out")(h)


class Decoder(nn.Module):
    """Latent → image (after ``post_quant_conv``)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_add_attention: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] → [B, h * 2**(n-1), w * 2**(n-1), out_channels]."""
        chans = tuple(reversed(tuple(self.block_out_channels)))
        h = _conv3x3(chans[0], "conv_in")(z)
        h = MidBlock(chans[0], self.groups, self.mid_block_add_attention, name="mid_block")(h)
        for i, ch in enumerate(chans):
            block = f"up_blocks_{i}"
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, self.groups, name=f"{block}_resnets_{j}")(h)
            if i != len(chans) - 1:
                h = Upsample(ch, name=f"{block}_upsamplers_0")(h)
        h = nn.silu(_group_norm(self.groups, "conv_norm_out")(h))
        return _conv3x3(self.out_channels, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder with diffusers' ``AutoencoderKL`` configuration keys.

    Attributes:
        in_channels: image channels in.
        out_channels: image channels out.
        block_out_channels: channels per resolution level; ``len - 1`` downsamplings.
        layers_per_block: ResNet blocks per encoder level (decoder levels get one more).
        latent_channels: latent channels.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        scaling_factor: multiplier applied to latents before diffusion (see
            :func:`scale_latents`); carried here so a loaded checkpoint brings its own.
        shift_factor: subtracted from latents before scaling (0 for SD-1/2 VAEs).
        use_quant_conv: whether the 1x1 ``quant_conv`` follows the encoder.
        use_post_quant_conv: whether the 1x1 ``post_quant_conv`` precedes the decoder.
        mid_block_add_attention: whether the mid blocks contain self-attention.

    Example:
        >>> vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
        ...                     norm_num_groups=8)
        >>> params = vae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jax.random.key(1))
        >>> mean, logvar = vae.apply(params, x, method=AutoencoderKL.encode)  # [B, 8, 8, 4]
        >>> x_rec = vae.apply(params, mean, method=AutoencoderKL.decode)      # [B, 32, 32, 1]
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def setup(self):
        validate_config(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
        )
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
        )
        self.encoder = Encoder(self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1))
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1))

    @property
    def downsampling_factor(self) -> int:
        """Spatial reduction from image to latent, ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(tuple(self.block_out_channels)) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior q(z | x) = N(mean, exp(logvar)).

        Args:
            x: [B, H, W, in_channels] float32 in [-1, 1]; H and W divisible by
                ``downsampling_factor``.

        Returns:
            mean, logvar: each [B, H / f, W / f, latent_channels]; logvar clipped to [-30, 20].
        """
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent z: [B, h, w, latent_channels] → image [B, h * f, w * f, out_channels]."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode, sample (or take the mean of) the posterior, decode.

        Args:
            x: [B, H, W, in_channels] float32 in [-1, 1].
            key: PRNG key for the posterior sample; required when ``sample_posterior``.
            sample_posterior: draw z ~ q(z | x) if True, else use z = mean.

        Returns:
            recon [B, H, W, out_channels], mean and logvar [B, H / f, W / f, latent_channels].
        """
        mean, logvar = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("key: a PRNG key is required when sample_posterior=True")
            z = sample_latent(key, mean, logvar)
        else:
            z = mean
        return self.decode(z), mean, logvar


def validate_config(
    *,
    in_channels: int,
    out_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    norm_num_groups: int,
) -> None:
    """Raise ValueError naming the field when an autoencoder configuration is invalid."""
    for name, value in [
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("layers_per_block", layers_per_block),
        ("latent_channels", latent_channels),
        ("norm_num_groups", norm_num_groups),
    ]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    chans = tuple(block_out_channels)
    if not chans or any(not isinstance(c, int) or c < 1 for c in chans):
        raise ValueError(
            f"block_out_channels={block_out_channels!r}: must be a non-empty sequence of "
            "positive integers"
        )
    bad = [c for c in chans if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"norm_num_groups={norm_num_groups}: must divide every entry of "
            f"block_out_channels={chans} (does not divide {bad})"
        )


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Reparameterised sample z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); shapes as mean."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims.

    Args:
        mean, logvar: [B, ...].

    Returns:
        [B] float32, ``0.5 * sum(mean**2 + exp(logvar) - 1 - logvar)``.
    """
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def estimate_scale_factor(latents: jax.Array) -> jax.Array:
    """Scale factor 1 / std of latents (Rombach et al. 2022, Sec. 4.3.2).

    Args:
        latents: [N, ...] unscaled latents (e.g. posterior samples of a batch of data).

    Returns:
        Scalar float32 ``1 / std(latents)`` over all elements, so that
        ``latents * scale`` has unit standard deviation.
    """
    latents = jnp.asarray(latents, jnp.float32)
    if latents.size < 2:
        raise ValueError(f"latents: need at least 2 elements to estimate a std, got {latents.size}")
    return 1.0 / jnp.std(latents)


def scale_latents(z: jax.Array, scaling_factor, shift_factor=0.0) -> jax.Array:
    """Autoencoder latent → diffusion latent, ``(z - shift_factor) * scaling_factor``."""
    return (z - shift_factor) * scaling_factor


def unscale_latents(z: jax.Array, scaling_factor, shift_factor=0.0) -> jax.Array:
    """Diffusion latent → autoencoder latent, ``z / scaling_factor + shift_factor``."""
    return z / scaling_factor + shift_factor
