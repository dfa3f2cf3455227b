"""Test helper: the embedded digits written out as a folder of image files, one sub-folder per
class, in a mix of formats (``experiments.folder``'s input without a download)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from ddpm_jax import data, images


def digit_image(x: np.ndarray, kind: str) -> tuple[Image.Image, str]:
    """One digit (uint8 ``[16, 16, 1]``) as a Pillow image of ``kind`` and its file extension:

    - ``"png"``: 8-bit grayscale PNG;
    - ``"jpeg"``: grayscale JPEG (quality 95);
    - ``"rgb"``: RGB PNG of the gray values;
    - ``"rgba"``: RGBA PNG, opaque;
    - ``"wide"``: a 20x16 (width x height) grayscale PNG: 2 black columns on each side (center
      cropping gives the digit back).
    - ``"png16"``: a 16-bit grayscale PNG (values x 257).
    """
    g = x[..., 0]
    if kind == "png":
        return Image.fromarray(g, "L"), ".png"
    if kind == "jpeg":
        return Image.fromarray(g, "L"), ".jpg"
    if kind == "rgb":
        return Image.fromarray(np.repeat(x, 3, -1), "RGB"), ".png"
    if kind == "rgba":
        alpha = np.full_like(g, 255)[..., None]
        return Image.fromarray(np.concatenate([np.repeat(x, 3, -1), alpha], -1), "RGBA"), ".png"
    if kind == "wide":
        return Image.fromarray(np.pad(g, ((0, 0), (2, 2))), "L"), ".png"
    if kind == "png16":
        return Image.fromarray(g.astype(np.uint16) * 257), ".png"
    raise ValueError(kind)


KINDS = ("png", "png", "png", "jpeg", "rgb", "rgba", "wide", "png16")


def write_digits_folder(
    directory: str,
    *,
    size: int = 16,
    split: str = "train",
    limit: int | None = None,
    kinds=KINDS,
    classes: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Writes the digits of ``split`` as ``directory/<class>/<index>.<ext>`` (``classes``: one
    folder per digit, named ``"0"`` .. ``"9"``; else all in ``directory``), upsampled to
    ``size`` (bilinear), cycling through ``kinds``.

    Returns:
      ``(images uint8 [N, size, size, 1], labels [N])`` as written (before any lossy encoding).
    """
    x, y = data.digits_arrays(split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = images.resize(x, (size, size))
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        pil, ext = digit_image(image, kinds[i % len(kinds)])
        folder = os.path.join(directory, str(label)) if classes else directory
        os.makedirs(folder, exist_ok=True)
        options = {"quality": 95} if ext == ".jpg" else {}
        pil.save(os.path.join(folder, f"{i:05d}{ext}"), **options)
    return x, y


def truncate(path: str, keep: float = 0.5) -> None:
    """Cuts a file to ``keep`` of its bytes (a download that stopped half-way)."""
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: max(1, int(len(content) * keep))])


def caption_digits_folder(directory: str, txt_every: int = 4) -> dict[str, str]:
    """Captions the digits of :func:`write_digits_folder` (class folders): ``"a handwritten
    {d}"`` in ``directory/metadata.jsonl``, except every ``txt_every``-th image, which gets
    ``"the digit {d}"`` in a ``.txt`` beside it. Returns ``{relative path: caption}``."""
    captions, lines = {}, []
    for i, rel in enumerate(
        sorted(
            os.path.join(d, f)
            for d in sorted(os.listdir(directory))
            if os.path.isdir(os.path.join(directory, d))
            for f in sorted(os.listdir(os.path.join(directory, d)))
        )
    ):
        digit = os.path.dirname(rel)
        if txt_every and i % txt_every == txt_every - 1:
            captions[rel] = f"the digit {digit}"
            with open(os.path.join(directory, os.path.splitext(rel)[0] + ".txt"), "w") as f:
                f.write(captions[rel] + "\n")
        else:
            captions[rel] = f"a handwritten {digit}"
            lines.append(json.dumps({"file_name": rel, "text": captions[rel]}))
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return captions
