"""The images, classes and captions of a folder, from its directory entries (nothing decoded).

Layout: sub-folders of the folder are classes (sorted names → label ids 0, 1, ...; images may sit
deeper inside a class folder), or images directly in the folder make an unlabelled dataset; both
at once is an error. Hidden files and folders (``.name``) are ignored; an image is a file whose
extension Pillow opens. Captions come from ``metadata.jsonl`` files (``{"file_name": ...,
"text": ...}`` per line, names relative to the file's folder: the layout of Hugging Face
``imagefolder``) or from a ``.txt`` file beside an image. :meth:`Listing.key` is the key of the
folder's prepared cache (``ddpm_jax.folder_source``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ddpm_jax.errors import UsageError
from ddpm_jax.folder_images import Preprocessing

FORMAT_VERSION = 1  # of the prepared cache (part of the key)
METADATA = "metadata.jsonl"
_IMAGE_EXTENSIONS = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
)


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a folder holds, from its directory entries alone (nothing decoded).

    Attributes:
      root: the folder (absolute).
      files: image paths relative to ``root``, sorted (by class, then name).
      labels: ``[N]`` int32 class ids (-1 without classes).
      classes: the class names (sub-folder names, sorted); empty without classes.
      stats: ``(relative path, size, mtime_ns)`` of every file (images, captions), sorted.
    """

    root: str
    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    stats: tuple[tuple[str, int, int], ...]

    def key(self, pre: Preprocessing) -> str:
        """The cache key: files, sizes, modification times and the preprocessing settings."""
        content = {"version": FORMAT_VERSION, "stats": self.stats, "pre": dataclasses.asdict(pre)}
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:24]


def _walk(directory: str) -> Iterator[str]:
    """Paths of the non-hidden files under ``directory``, sorted, recursively."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(root, name)


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in _IMAGE_EXTENSIONS


def scan_folder(directory: str) -> Listing:
    """Lists the images and classes of ``directory`` (see the module docstring).

    Raises:
      UsageError: not a readable directory, no image, or images beside class folders.
    """
    root = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
        raise UsageError(f"data.dir={directory!r} is not a readable directory")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    top_images = [e for e in entries if e not in subdirs and _is_image(e)]
    everything = list(_walk(root))
    if subdirs and top_images:
        raise UsageError(
            f"data.dir={root!r} holds images ({top_images[0]!r}, ...) beside sub-folders "
            f"({subdirs[0]!r}, ...): put every image in a class folder, or none"
        )
    files, labels = [], []
    classes = tuple(subdirs) if subdirs else ()
    for label, name in enumerate(classes):
        found = [p for p in _walk(os.path.join(root, name)) if _is_image(p)]
        files += [os.path.relpath(p, root) for p in found]
        labels += [label] * len(found)
    if not classes:
        files = top_images
        labels = [-1] * len(files)
    if not files:
        what = f"its sub-folders {list(classes)[:5]}" if classes else "it"
        raise UsageError(
            f"data.dir={root!r} has no image in {what}: put images (any format Pillow reads: "
            f"{', '.join(sorted(e[1:] for e in ('.png', '.jpg', '.webp', '.bmp', '.tiff')))}, ...) "
            "in it, or in one sub-folder per class"
        )
    stats = []
    for path in everything:
        st = os.stat(path)
        stats.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return Listing(root, tuple(files), np.asarray(labels, np.int32), classes, tuple(stats))


def read_captions(listing: Listing) -> list[str | None]:
    """The caption of every image (None where it has none): ``metadata.jsonl`` entries first,
    then a ``.txt`` beside the image.

    Raises:
      UsageError: a ``metadata.jsonl`` line that is not ``{"file_name": str, "text": str}`` or
        that names a file that is not an image of the folder (file and line named).
    """
    index = {f: i for i, f in enumerate(listing.files)}
    captions: list[str | None] = [None] * len(listing.files)
    for rel, _, _ in listing.stats:
        if os.path.basename(rel) != METADATA:
            continue
        base = os.path.dirname(rel)
        with open(os.path.join(listing.root, rel), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{os.path.join(listing.root, rel)} line {number}"
                try:
                    entry = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{where} is not JSON ({e})") from None
                ok = isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                if not ok or not isinstance(entry.get("text"), str):
                    raise UsageError(f'{where}: expected {{"file_name": str, "text": str}}')
                name = os.path.normpath(os.path.join(base, entry["file_name"]))
                if name not in index:
                    raise UsageError(f"{where}: file_name {entry['file_name']!r} is not an image")
                captions[index[name]] = entry["text"]
    for i, rel in enumerate(listing.files):
        txt = os.path.join(listing.root, os.path.splitext(rel)[0] + ".txt")
        if captions[i] is None and os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                captions[i] = f.read().strip()
    return captions


__all__ = ["FORMAT_VERSION", "METADATA", "Listing", "read_captions", "scan_folder"]
