"""A captioned folder of images as the prompts of a latent text-conditioned run.

Each image's caption (``metadata.jsonl`` or a ``.txt`` beside it, ``ddpm_jax.folder_scan``) is
normalised to its words (``models.text.split_words``: lower case, punctuation dropped), so "A
handwritten 7." and "a handwritten 7" are one prompt. The prompts are the distinct normalised
captions, sorted; image ``i`` is paired with the prompt of its caption. :func:`check_captions`
validates them before anything is decoded (one line naming a file and the fix);
:func:`caption_prompts` maps the captions of the prepared images to prompts and, for evaluation
and ``samples.npz``, each prompt to a class: the class sub-folder all of its images share (-1
when they are in several), or the prompt's own id in a folder without classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ddpm_jax.errors import UsageError
from ddpm_jax.folder_scan import Listing, read_captions, scan_folder
from ddpm_jax.models.text import split_words


def normalise(caption: str) -> str:
    """The caption as a prompt: its words, lower case, joined by single spaces."""
    return " ".join(split_words(caption))


def folder_captions(directory: str) -> tuple[Listing, list[str | None]]:
    """The folder's listing and the caption of each of its images (None: none).

    Raises:
      UsageError: see ``folder_scan.scan_folder`` and ``folder_scan.read_captions``.
    """
    listing = scan_folder(directory)
    return listing, read_captions(listing)


def all_captioned(directory: str | None) -> bool:
    """Whether every image of ``directory`` has a caption (False when it cannot be listed: the
    run then reports why)."""
    if directory is None:
        return False
    try:
        return all(c is not None for c in folder_captions(directory)[1])
    except (UsageError, OSError):
        return False


def longest_caption(directory: str) -> int:
    """The most words of a caption of ``directory`` (0 without captions or a readable folder)."""
    try:
        captions = folder_captions(directory)[1]
    except (UsageError, OSError):
        return 0
    return max((len(split_words(c)) for c in captions if c is not None), default=0)


def check_captions(listing: Listing, captions: Sequence[str | None], max_length: int) -> None:
    """Every image has a caption with 1 to ``max_length`` words.

    Raises:
      UsageError: one line: how many images lack a caption, have an empty one (no word) or one
        longer than ``max_length`` words, with the first such file and the fix.
    """
    paths = [os.path.join(listing.root, f) for f in listing.files]
    missing = [p for p, c in zip(paths, captions, strict=True) if c is None]
    if missing:
        raise UsageError(
            f"data.captions=True: {len(missing)} of {len(paths)} images of {listing.root!r} have "
            f"no caption (e.g. {missing[0]}): add them to metadata.jsonl or a .txt beside each "
            "image, or pass --config.data.captions=False to ignore the captions"
        )
    words = [len(split_words(c)) for c in captions]
    empty = [p for p, n in zip(paths, words, strict=True) if n == 0]
    if empty:
        raise UsageError(
            f"data.dir={listing.root!r}: {len(empty)} image(s) have an empty caption (no word "
            f"of letters or digits), e.g. {empty[0]}: write a caption for each"
        )
    long = [(p, n) for p, n in zip(paths, words, strict=True) if n > max_length]
    if long:
        path, n = max(long, key=lambda pn: pn[1])
        raise UsageError(
            f"data.dir={listing.root!r}: {len(long)} caption(s) have more than "
            f"latent.text_max_length={max_length} words, the longest {n} ({path}): pass "
            f"--config.latent.text_max_length={n} or shorten them"
        )


class CaptionPrompts(NamedTuple):
    """The prompts of a captioned folder (see :func:`caption_prompts`).

    Attributes:
      prompts: the P distinct normalised captions, sorted.
      image_prompt: int32 ``[N]``, the prompt of each image.
      prompt_class: int32 ``[P]``, the class each prompt stands for in evaluation and samples.
    """

    prompts: list[str]
    image_prompt: np.ndarray
    prompt_class: np.ndarray


def caption_prompts(captions: Sequence[str], labels: np.ndarray) -> CaptionPrompts:
    """The prompts of the prepared images' captions (checked by :func:`check_captions`).

    Args:
      captions: the N images' captions.
      labels: int32 ``[N]`` class of each image (-1 everywhere in a folder without classes).
    """
    texts = [normalise(c) for c in captions]
    prompts = sorted(set(texts))
    ids = {p: i for i, p in enumerate(prompts)}
    image_prompt = np.asarray([ids[t] for t in texts], np.int32)
    labels = np.asarray(labels, np.int32)
    prompt_class = np.arange(len(prompts), dtype=np.int32)
    if labels.size and labels.min() >= 0:
        for p in range(len(prompts)):
            found = np.unique(labels[image_prompt == p])
            prompt_class[p] = found[0] if len(found) == 1 else -1
    return CaptionPrompts(prompts, image_prompt, prompt_class)


__all__ = [
    "CaptionPrompts",
    "all_captioned",
    "caption_prompts",
    "check_captions",
    "folder_captions",
    "longest_caption",
    "normalise",
]
