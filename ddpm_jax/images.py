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


def make_grid(images, ncols: int, padding: int = 1) -> np.ndarray:
    """Tiles images row by row into one image, with ``padding`` black pixels around each tile.

    Args:
      images: ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in [-1, 1].
      ncols: tiles per row (capped at N); rows are ``ceil(N / ncols)``, empty tiles are black.
      padding: pixels between tiles and around the border, >= 0.

    Returns:
      uint8 ``[rows * (H + padding) + padding, cols * (W + padding) + padding, C]``.
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
    n, h, w, c = images.shape
    cols = min(int(ncols), n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png_grid(path: str | os.PathLike, images, ncols: int, padding: int = 1) -> str:
    """Writes ``make_grid(images, ncols, padding)`` as a PNG, atomically (temp file + replace).

    Grayscale (C = 1) is saved in PIL mode ``L``, C = 3 as ``RGB``, C = 4 as ``RGBA``. Parent
    directories are created.

    Args:
      path: destination ``.png`` file.
      images: ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in [-1, 1].
      ncols: tiles per row.
      padding: pixels between tiles.

    Returns:
      ``path`` as a string.
    """
    grid = make_grid(images, ncols, padding)
    channels = grid.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"images have {channels} channels; PNG grids support 1, 3 or 4")
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return os.fspath(path)
