"""Class names on sample grids: a folder run's classes written above the tiles that show them.

A folder run records its class names in ``WORKDIR/folder.json`` (``ddpm_jax.folder_source``);
:func:`label_names` reads them as the name of each conditioning label, and :func:`labelled_grid`
draws the :data:`~ddpm_jax.images.READABLE` grid with a caption band (Pillow's default font, dark
text on white): one band above the grid when every column shows one class (a class-conditional
grid of ``g`` columns whose ``g`` is a multiple of the classes: column j shows class j), else a
band above each row of tiles, one name per tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax import folder_source, images as images_lib

FONT_SIZE = 12  # pixels: readable without zooming
BAND = FONT_SIZE + 6  # the caption band's height


def label_names(workdir: str | None, label_classes: np.ndarray | None = None) -> list[str] | None:
    """The name of each conditioning label of the run in ``workdir``: its ``folder.json`` class
    names (``label_classes`` maps labels to classes, e.g. a latent run's prompts; a label of class
    -1 gets ``""``); None for a run without class names."""
    classes = (folder_source.read_run_info(workdir) or {}).get("classes")
    if not classes:
        return None
    if label_classes is None:
        return list(classes)
    return [classes[k] if 0 <= k < len(classes) else "" for k in np.asarray(label_classes)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _band(texts: Sequence[str], cell: int, width: int, padding: int, channels: int) -> np.ndarray:
    """uint8 ``[BAND, width, channels]``: ``texts[j]`` centred over the tile of column ``j`` (cut
    to the tile's width)."""
    band = Image.new("L", (width, BAND), 255)
    draw, font = ImageDraw.Draw(band), _font(FONT_SIZE)
    for j, text in enumerate(texts):
        while text and draw.textlength(text, font=font) > cell - padding:
            text = text[:-1]
        left = padding + j * cell + (cell - padding - draw.textlength(text, font=font)) / 2
        draw.text((left, 3), text, fill=0, font=font)
    return np.repeat(np.asarray(band)[..., None], channels, axis=-1)


def labelled_grid(
    images, ncols: int, labels=None, names: Sequence[str] | None = None
) -> np.ndarray:
    """The readable grid of ``images`` (``images.make_grid(..., **READABLE)``) with the name of
    each tile's label (see the module docstring); without names, or labels all outside
    ``names``, the plain grid.

    Args:
      images: ``[N, H, W, C]`` or ``[N, H, W]``, uint8 or float in [-1, 1].
      ncols: tiles per row.
      labels: int ``[N]``, the label each image shows (-1: none), or None.
      names: the name of each label, or None.

    Returns:
      uint8 ``[H', W, C]``: the grid's rows with a band of names above the first, or above each.
    """
    padding = 1
    grid = images_lib.make_grid(images, ncols, padding, **images_lib.READABLE)
    if names is None or labels is None:
        return grid
    labels = np.asarray(labels).reshape(-1)
    texts = [names[k] if 0 <= k < len(names) else "" for k in labels.tolist()]
    if not any(texts):
        return grid
    n, cols = len(texts), min(ncols, len(texts))
    rows = -(-n // cols)
    cell, row = (grid.shape[1] - padding) // cols, (grid.shape[0] - padding) // rows
    channels = grid.shape[-1]
    band = lambda t: _band(t, cell, grid.shape[1], padding, channels)
    if all(len(set(texts[j::cols])) == 1 for j in range(cols)):  # column j: one class
        return np.concatenate([band(texts[:cols]), grid])
    parts = []
    for r in range(rows):
        parts += [band(texts[r * cols : (r + 1) * cols]), grid[r * row : (r + 1) * row]]
    return np.concatenate([*parts, grid[rows * row :]])


__all__ = ["BAND", "FONT_SIZE", "label_names", "labelled_grid"]
