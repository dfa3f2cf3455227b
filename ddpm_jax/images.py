"""Image I/O at the edges: [-1, 1] floats to uint8, resizing, image grids, atomic PNG writes."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ddpm_jax.workdir import atomic_open


def to_uint8(x) -> np.ndarray:
    """Maps float images in [-1, 1] to uint8 in [0, 255], rounding to nearest and clipping.

    Args:
      x: array of any shape (numpy or jax), float in [-1, 1]; uint8 input is returned as is.

    Returns:
      uint8 array of the same shape: ``clip(round((x + 1) * 127.5), 0, 255)``.
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x has dtype {x.dtype}; expected float images in [-1, 1] or uint8")
    return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking, PIL) of uint8 images to ``hw``.

    Args:
      images: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
      hw: ``(height, width)``.

    Returns:
      uint8 ``[h, w, C]`` or ``[N, h, w, C]``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"images: expected uint8 [(N,) H, W, C], got {images.dtype} {images.shape}"
        )
    if images.ndim == 4:
        return np.stack([resize(image, hw) for image in images])
    pil = Image.fromarray(images[..., 0] if images.shape[-1] == 1 else images)
    out = np.asarray(pil.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


# A grid a person can read without zooming: cells enlarged (nearest neighbour) to a grid at least
# 256 pixels wide, separated by thin grey lines (visible on black or white backgrounds).
READABLE = dict(min_width=256, separator=128)


def make_grid(
    images, ncols: int, padding: int = 1, *, min_width: int = 0, separator: int = 0
) -> np.ndarray:
    """Tiles images row by row into one image, with ``padding`` pixels around each tile.

    Args:
      images: ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in [-1, 1].
      ncols: tiles per row (capped at N); rows are ``ceil(N / ncols)``, empty tiles are black.
      padding: pixels between tiles and around the border, >= 0.
      min_width: each tile is enlarged by the smallest integer factor (nearest neighbour) that
        makes the grid at least this wide.
      separator: the uint8 value of the padding.

    Returns:
      uint8 ``[rows * (H' + padding) + padding, cols * (W' + padding) + padding, C]`` with
      ``H' = s H``, ``W' = s W`` for the enlargement ``s``.
    """
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images has shape {images.shape}; expected [N, H, W, C] with N >= 1")
    if not isinstance(ncols, int | np.integer) or ncols < 1:
        raise ValueError(f"ncols={ncols!r} must be a positive integer")
    if not isinstance(padding, int | np.integer) or padding < 0:
        raise ValueError(f"padding={padding!r} must be a non-negative integer")
    cols = min(int(ncols), images.shape[0])
    scale = max(1, -(-(min_width - padding * (cols + 1)) // (cols * images.shape[2])))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = -(-n // cols)
    shape = (rows * (h + padding) + padding, cols * (w + padding) + padding, c)
    grid = np.full(shape, separator, np.uint8)
    for i in range(rows * cols):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = images[i] if i < n else 0
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Writes a uint8 ``[H, W, C]`` image (C = 1: mode ``L``; 3: ``RGB``; 4: ``RGBA``) as a PNG,
    atomically; parent directories are created. Returns ``path`` as a string."""
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"images have {channels} channels; PNG grids support 1, 3 or 4")
    with atomic_open(path, "wb") as f:
        Image.fromarray(image[..., 0] if channels == 1 else image).save(f, format="PNG")
    return os.fspath(path)


def save_png_grid(path: str | os.PathLike, images, ncols: int) -> str:
    """Writes the :data:`READABLE` ``make_grid(images, ncols)`` as a PNG (see :func:`save_png`).

    Args:
      path: destination ``.png`` file.
      images: ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in [-1, 1].
      ncols: tiles per row (a class-conditional grid keeps one class per column).

    Returns:
      ``path`` as a string.
    """
    return save_png(path, make_grid(images, ncols, **READABLE))
