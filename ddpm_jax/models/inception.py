"""The FID Inception-v3 (`pt_inception-2015-12-05`) in Flax, with torch-compatible preprocessing.

This is the network of pytorch-fid and clean-fid, i.e. TensorFlow's 2015 Inception-v3 graph as
ported to torch: torchvision's Inception-v3 with 1008 classes, no auxiliary classifier, and the
FID-specific blocks, whose 3x3 average pools exclude the zero padding (`count_include_pad=False`)
and whose last block (Mixed_7c) max-pools in its pool branch.

Layout is NHWC; module and parameter names follow the torch state dict (`Mixed_5b.branch1x1.conv`
...), so :func:`ddpm_jax.weights.fid_inception.variables_from_torch` is a mechanical rename plus
OIHW -> HWIO transposes. Every convolution is followed by BatchNorm in inference mode (eps = 1e-3)
and ReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (inference, eps=1e-3) + ReLU; torch-style symmetric padding."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool over the unpadded pixels only (TensorFlow's, used by FID)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
        c7 = self.channels_7x7
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (`pool="avg"`, padding excluded) and Mixed_7c (`pool="max"`) of the FID net."""

    pool: str = "avg"
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3.

    Call: x [N, H, W, 3] float32 in [-1, 1] (299x299 for standard FID features) ->
    (pool [N, 2048] features after the global average pool, logits [N, 1008]).
    """

    precision: Any = None

    @nn.compact
    def __call__(self, x):
        p = self.precision
        x = BasicConv2d(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=p, name="fc")(pool)
        return pool, logits


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear interpolation (align_corners=False, no antialias)."""
    # Source coordinates in float32 arithmetic, as torch computes them for float32 images.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0.0), f32(1.0)).astype(np.float64)
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes like torch's `F.interpolate(mode="bilinear", align_corners=False)`.

    Source coordinates are (i + 0.5) * in / out - 0.5, clamped at 0, interpolated between the
    two nearest pixels without antialiasing, for upsampling and downsampling alike.

    Args:
        images: [N, H, W, C] float array.
        size: (out_height, out_width).

    Returns:
        [N, out_height, out_width, C] array of the same dtype.
    """
    _, h, w, _ = images.shape
    if (h, w) == tuple(size):
        return images
    rows = jnp.asarray(_bilinear_matrix(h, size[0]))
    cols = jnp.asarray(_bilinear_matrix(w, size[1]))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, images, precision=hp)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=hp).astype(images.dtype)


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """pytorch-fid's input pipeline: uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1]."""
    x = images_uint8.astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


def make_features_fn(
    variables: dict,
    *,
    batch_size: int = 50,
    with_logits: bool = False,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Callable:
    """Batched, jitted feature extractor around `FIDInceptionV3`.

    Args:
        variables: from `ddpm_jax.weights.fid_inception.variables_from_torch`.
        batch_size: images per device call; the last batch is zero-padded to it.
        with_logits: also return the logits.
        precision: convolution / dense precision.

    Returns:
        `features_fn(images)`: uint8 [N, H, W, 3] -> float32 NumPy pool features [N, 2048]
        (and logits [N, 1008] when `with_logits`).
    """
    variables = jax.device_put(variables)
    module = FIDInceptionV3(precision=precision)
    network = jax.jit(module.apply)
    prepare = jax.jit(preprocess)

    def features_fn(images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
            )
        pools, logits = [], []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            n = batch.shape[0]
            if n < batch_size:
                batch = np.concatenate(
                    [batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)]
                )
            pool, logit = network(variables, prepare(batch))
            pools.append(np.asarray(pool)[:n])
            logits.append(np.asarray(logit)[:n])
        if not pools:
            pools, logits = (
                [np.zeros((0, POOL_FEATURES), np.float32)],
                [np.zeros((0, NUM_CLASSES), np.float32)],
            )
        pool, logit = np.concatenate(pools), np.concatenate(logits)
        return (pool, logit) if with_logits else pool

    return features_fn
