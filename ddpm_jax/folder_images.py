"""One image file of a folder dataset → the uint8 array a run trains on (Pillow, no JAX).

:func:`load_image` decodes any format Pillow reads (PNG, JPEG, WebP, BMP, TIFF, GIF, ...), applies
the EXIF orientation, composites transparency (RGBA, LA, palette with a transparent colour) on
white, maps 16-bit and float images to 8 bits, converts to the run's channels and crops and
resizes with Lanczos:

- ``crop="center"``: the largest centred square, resized to ``size`` x ``size``;
- ``crop="random"``: resized so that the short side is ``size`` (the long side keeps the aspect
  ratio); training takes a random ``size`` x ``size`` window of it (:func:`random_crop`), a
  different one at every epoch.

A file Pillow cannot read, or reads only in part (a truncated PNG or JPEG), raises
:class:`Unreadable` with the reason; an image smaller than ``size`` with ``upscale=False`` raises
:class:`TooSmall`. Both are collected by ``ddpm_jax.folder_source`` rather than stopping at the
first one. :func:`load_images` decodes many files with a pool of threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

CROPS = ("center", "random")
CHANNELS = (1, 3)

# What Pillow raises for a file it cannot identify or decode (UnidentifiedImageError and
# "image file is truncated" are OSErrors); anything else is a bug and keeps its traceback.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class Unreadable(Exception):
    """The file cannot be decoded; ``str(e)`` is the reason."""


class TooSmall(Exception):
    """The image is smaller than the target size and upscaling is off; ``str(e)`` says how."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How every image of a folder is turned into a training example (part of the cache key).

    Attributes:
      image_size: side ``S`` of the square training images.
      crop: ``"center"`` or ``"random"`` (see the module docstring).
      channels: 1 (grayscale), 3 (RGB) or None: 1 when every image of the folder is gray
        (R = G = B after conversion), else 3 (decided once the folder is prepared).
      upscale: whether images smaller than ``S`` are enlarged (else :class:`TooSmall`).
    """

    image_size: int
    crop: str = "center"
    channels: int | None = None
    upscale: bool = True

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r} must be a positive integer")
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r} must be one of {CROPS}")
        if self.channels is not None and self.channels not in CHANNELS:
            raise ValueError(f"channels={self.channels!r} must be one of {CHANNELS} or None")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float images as 8-bit grayscale (scaled, not clipped)."""
    a = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif a.size and a.max() > 255:
        a = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _convert(image: Image.Image, channels: int | None) -> Image.Image:
    """The image as mode ``"L"`` (``channels=1``) or ``"RGB"``, transparency on white."""
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _resize(image: Image.Image, pre: Preprocessing) -> Image.Image:
    w, h = image.size
    s, size = min(w, h), pre.image_size
    if s < size and not pre.upscale:
        raise TooSmall(f"{w}x{h} is smaller than data.image_size={size} (data.upscale=False)")
    if pre.crop == "center":
        left, top = (w - s) / 2, (h - s) / 2
        box = (left, top, left + s, top + s)
        return image.resize((size, size), Image.Resampling.LANCZOS, box=box)
    out = (max(size, round(w * size / s)), max(size, round(h * size / s)))
    return image.resize(out, Image.Resampling.LANCZOS)


def load_image(path: str, pre: Preprocessing) -> np.ndarray:
    """The training example of one file: uint8 ``[S, S, C]`` (center crop) or ``[S, L, C]`` /
    ``[L, S, C]`` with ``L >= S`` (random crop); ``C`` is 1 for ``channels=1``, else 3.

    Raises:
      Unreadable: Pillow cannot identify or fully decode the file (the reason is the message).
      TooSmall: smaller than ``pre.image_size`` with ``pre.upscale=False``.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":  # decode at a reduced scale when much larger (DCT scaling)
                image.draft(image.mode, (pre.image_size, pre.image_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _convert(image, pre.channels)
    except DECODE_ERRORS as e:
        raise Unreadable(f"{type(e).__name__}: {' '.join(str(e).split())}") from e
    out = np.asarray(_resize(image, pre), np.uint8)
    return out[..., None] if out.ndim == 2 else out


def load_images(
    paths: Sequence[str], pre: Preprocessing, workers: int
) -> Iterator[np.ndarray | Unreadable | TooSmall]:
    """:func:`load_image` of every path, in order, decoded by ``workers`` threads (Pillow releases
    the GIL while decoding and resizing); a file that fails gives its exception instead."""

    def load(path: str) -> np.ndarray | Unreadable | TooSmall:
        try:
            return load_image(path, pre)
        except (Unreadable, TooSmall) as e:
            return e

    window = 4 * workers  # results held at once
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def is_gray(image: np.ndarray) -> bool:
    """Whether a ``[H, W, C]`` image has one channel or equal R, G and B everywhere."""
    if image.shape[-1] == 1:
        return True
    return bool(np.all(image[..., 0] == image[..., 1]) and np.all(image[..., 1] == image[..., 2]))


def random_crop(example: dict[str, Any], rng: np.random.Generator, *, size: int) -> dict[str, Any]:
    """A random ``size`` x ``size`` window of ``example["image"]`` (short side ``size``)."""
    image = example["image"]
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return {**example, "image": image[top : top + size, left : left + size]}


__all__ = [
    "CHANNELS",
    "CROPS",
    "Preprocessing",
    "TooSmall",
    "Unreadable",
    "is_gray",
    "load_image",
    "load_images",
    "random_crop",
]
