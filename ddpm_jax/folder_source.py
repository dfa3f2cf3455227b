"""A folder of your own images as a random-access source, prepared once into an ArrayRecord cache.

Preparing (:func:`prepare_folder`) lists the folder (``ddpm_jax.folder_scan``: classes from
sub-folders, captions), decodes, crops and resizes every image (``ddpm_jax.folder_images``) with
one thread per core and writes ``images.array_record`` (one record per image: its raw bytes;
shapes and labels in ``index.npz``, classes, channels and captions in ``manifest.json``) into
``<cache_dir>/<key>/``, built in a temporary folder and renamed into place, so that a reader sees
a complete cache or none. The key hashes the folder's file list, sizes and modification times and
the :class:`~ddpm_jax.folder_images.Preprocessing`: a later run (any process) reads the cache; a
changed folder gets a new key and is prepared again. Unreadable files are all listed (path and
reason) in one :class:`UnreadableImagesError` unless ``skip_unreadable``, in which case they are
left out (the manifest lists them). In a multi-process job process 0 prepares while the others
wait, then they read the same cache (or prepare their own where the cache folder is not shared).

A run records what it trained on in its workdir (:func:`write_run_info`: ``folder.json`` with the
class names, channels and shape), so that it can be loaded for sampling without the folder
(:func:`folder_spec`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import folder_images
from ddpm_jax.errors import UsageError
from ddpm_jax.folder_images import Preprocessing
from ddpm_jax.folder_scan import FORMAT_VERSION, Listing, read_captions, scan_folder
from ddpm_jax.workdir import is_writer, log, warn, write_json

FOLDER = "folder"  # config.data.name of a folder dataset
RECORDS, INDEX, MANIFEST = "images.array_record", "index.npz", "manifest.json"


class UnreadableImagesError(UsageError):
    """Files of the folder that cannot be decoded (``unreadable``: ``[(path, reason), ...]``)."""

    def __init__(self, message: str, unreadable: Sequence[tuple[str, str]]):
        super().__init__(message)
        self.unreadable = list(unreadable)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ddpm_jax/folders`` (default ``~/.cache/ddpm_jax/folders``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax", "folders")


# ----------------------------------------------------------------------------- the prepared cache


class FolderSource:
    """Random access to a prepared cache: ``source[i] -> {"image": uint8 [H, W, C], "label"}``.

    Args:
      path: the prepared cache folder.
      channels: the run's channels (a cache of gray RGB records is read as its first channel).
    """

    def __init__(self, path: str, channels: int):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        with np.load(os.path.join(path, INDEX)) as f:
            self._shapes, self._labels = f["shapes"], f["labels"]
        self._records = ArrayRecordDataSource([os.path.join(path, RECORDS)])
        self._channels = channels

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image = np.frombuffer(self._records[index], np.uint8).reshape(self._shapes[index])
        return {"image": image[..., : self._channels], "label": self._labels[index]}


def _manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def open_cache(path: str) -> FolderSource:
    """The source of a prepared cache folder, with the channels it was prepared for.

    Raises:
      UsageError: ``path`` is not a prepared folder.
    """
    manifest = _manifest(path)
    if manifest is None:
        raise UsageError(
            f"{path!r} is not a prepared image folder (its data.dir may have changed since: run "
            "the training command once to prepare it again)"
        )
    return FolderSource(path, manifest["channels"])


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
    """A prepared folder (see :func:`prepare_folder`).

    Attributes:
      path: the cache folder ``<cache_dir>/<key>``.
      root: the image folder.
      classes: class names (label ids are their positions); empty without classes.
      channels: the images' channels (1 or 3).
      image_shape: ``(S, S, C)`` of the training examples.
      num_examples: the images prepared.
      unreadable: ``[(path, reason), ...]`` of the skipped files.
      num_captions: images with a caption.
      from_cache: whether the cache existed (False: prepared now).
      source: the random-access source of uncropped examples.
      augment: the random crop (``crop="random"``) as ``fn(example, rng)``, else None.
    """

    path: str
    root: str
    classes: tuple[str, ...]
    channels: int
    image_shape: tuple[int, int, int]
    num_examples: int
    unreadable: tuple[tuple[str, str], ...]
    num_captions: int
    from_cache: bool
    source: FolderSource
    augment: Callable[[dict, np.random.Generator], dict] | None

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for a folder without class sub-folders."""
        return len(self.classes) or None

    def info(self) -> dict[str, Any]:
        """What a run records about its data (``folder.json``)."""
        return dict(
            dir=self.root,
            cache=self.path,
            classes=list(self.classes),
            channels=self.channels,
            image_shape=list(self.image_shape),
            num_examples=self.num_examples,
            num_captions=self.num_captions,
            unreadable=[list(u) for u in self.unreadable],
        )


class _Progress:
    """``preparing DIR: 1200/1797 images (350/s)``: redrawn on a terminal, else every 10 s."""

    def __init__(self, root: str, total: int):
        self.root, self.total = root, total
        self.t0 = self.last = time.time()
        self.tty = sys.stdout.isatty()

    def __call__(self, done: int, bad: int, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        text = f"preparing {self.root}: {done}/{self.total} images ({rate:.0f}/s)"
        text += f", {bad} unreadable" if bad else ""
        if self.tty:
            log("\r" + text, end="\n" if final else "")
        else:
            log(text)


def _unreadable_message(root: str, bad: Sequence[tuple[str, str]]) -> str:
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return (
        f"data.dir={root!r}: {len(bad)} unreadable image file(s): {shown}. Repair or remove them, "
        "or pass --config.data.skip_unreadable=True to train without them"
    )


def _prepare(listing: Listing, pre: Preprocessing, final: str, workers: int) -> None:
    """Decodes every image of ``listing`` and writes the cache folder ``final`` atomically.

    Raises:
      UsageError: images smaller than the target (``upscale=False``); the cache folder cannot
        be written.
      UnreadableImagesError: every file is unreadable (otherwise the cache is written and lists
        the unreadable ones).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    captions = read_captions(listing)  # a bad metadata.jsonl stops before anything is decoded
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final)}.")
    except OSError as e:
        raise UsageError(
            f"data.cache_dir={parent!r} cannot be written ({e.strerror}): pass "
            "--config.data.cache_dir=<a writable directory> for the prepared images"
        ) from None
    try:
        writer = ArrayRecordWriter(os.path.join(tmp, RECORDS), "group_size:1")
        shapes, labels, kept_captions, bad, small, gray = [], [], [], [], [], True
        progress = _Progress(listing.root, len(listing.files))
        paths = [os.path.join(listing.root, f) for f in listing.files]
        loaded = folder_images.load_images(paths, pre, workers)
        for i, (path, out) in enumerate(zip(paths, loaded, strict=True)):
            if isinstance(out, folder_images.Unreadable):
                bad.append((path, str(out)))
            elif isinstance(out, folder_images.TooSmall):
                small.append((path, str(out)))
            else:
                writer.write(np.ascontiguousarray(out).tobytes())
                shapes.append(out.shape)
                labels.append(int(listing.labels[i]))
                kept_captions.append(captions[i])
                gray = gray and folder_images.is_gray(out)
            progress(i + 1, len(bad))
        writer.close()
        progress(len(paths), len(bad), final=True)
        if small:
            raise UsageError(
                f"data.dir={listing.root!r}: {len(small)} image(s) smaller than the target, e.g. "
                f"{small[0][0]} ({small[0][1]}): pass --config.data.upscale=True to enlarge them"
            )
        if not shapes:
            raise UnreadableImagesError(_unreadable_message(listing.root, bad), bad)
        channels = pre.channels or (1 if gray else 3)
        np.savez(
            os.path.join(tmp, INDEX),
            shapes=np.asarray(shapes, np.int32),
            labels=np.asarray(labels, np.int32),
        )
        manifest = dict(
            version=FORMAT_VERSION,
            root=listing.root,
            preprocessing=dataclasses.asdict(pre),
            classes=list(listing.classes),
            channels=channels,
            num_examples=len(shapes),
            unreadable=[list(b) for b in bad],
            captions=kept_captions,
        )
        write_json(os.path.join(tmp, MANIFEST), manifest)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its identical cache into place first
            if not os.path.isfile(os.path.join(final, MANIFEST)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(path: str, root: str, pre: Preprocessing, from_cache: bool) -> PreparedFolder | None:
    manifest = _manifest(path)
    if manifest is None:
        return None
    channels, size = manifest["channels"], pre.image_size
    augment = None
    if pre.crop == "random":
        augment = lambda example, rng: folder_images.random_crop(example, rng, size=size)
    return PreparedFolder(
        path=path,
        root=root,
        classes=tuple(manifest["classes"]),
        channels=channels,
        image_shape=(size, size, channels),
        num_examples=manifest["num_examples"],
        unreadable=tuple(tuple(u) for u in manifest["unreadable"]),
        num_captions=sum(c is not None for c in manifest["captions"]),
        from_cache=from_cache,
        source=FolderSource(path, channels),
        augment=augment,
    )


def prepare_folder(
    directory: str,
    pre: Preprocessing,
    *,
    cache_dir: str | None = None,
    skip_unreadable: bool = False,
    workers: int | None = None,
) -> PreparedFolder:
    """The prepared cache of ``directory`` (prepared now unless a cache of the same key exists).

    Args:
      directory: the image folder (``data.dir``).
      pre: the preprocessing settings.
      cache_dir: where prepared folders are kept (None: :func:`default_cache_dir`).
      skip_unreadable: leave unreadable files out (listed in ``unreadable``) instead of failing.
      workers: decoding threads (None: one per core).

    Raises:
      UsageError: see :func:`scan_folder`, :func:`read_captions`; images smaller than the target
        with ``upscale=False``; an unwritable cache folder.
      UnreadableImagesError: unreadable files without ``skip_unreadable`` (all of them listed).
    """
    listing = scan_folder(directory)
    cache_root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    path = os.path.join(cache_root, listing.key(pre))
    workers = workers or os.cpu_count() or 1
    failure: Exception | None = None
    cached = os.path.isfile(os.path.join(path, MANIFEST))
    if is_writer():
        try:
            if not cached:
                _prepare(listing, pre, path, workers)
        except UsageError as e:
            failure = e
    if jax.process_count() > 1:  # the others wait for process 0, then read (or prepare) too
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is not None)))
        if failed and failure is None:
            raise UsageError(f"data.dir={listing.root!r}: process 0 could not prepare it")
    if failure is not None:
        raise failure
    prepared = _open(path, listing.root, pre, from_cache=cached)
    if prepared is None:  # a process whose file system does not share process 0's cache
        _prepare(listing, pre, path, workers)
        prepared = _open(path, listing.root, pre, from_cache=False)
    if prepared.unreadable and not skip_unreadable:
        bad = prepared.unreadable
        raise UnreadableImagesError(_unreadable_message(listing.root, bad), bad)
    return prepared


def folder_spec(
    directory: str, pre: Preprocessing, *, cache_dir: str | None = None, run_info: dict | None
) -> tuple[tuple[int, int, int], int | None]:
    """``((S, S, C), num_classes)`` of a folder run without preparing anything: from the run's
    ``folder.json`` (``run_info``), else from the folder's prepared cache.

    Raises:
      UsageError: neither is available.
    """
    if run_info is not None:
        return tuple(run_info["image_shape"]), len(run_info["classes"]) or None
    try:
        listing = scan_folder(directory)
        cache_root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
        prepared = _open(os.path.join(cache_root, listing.key(pre)), listing.root, pre, True)
    except UsageError:
        prepared = None
    if prepared is None:
        raise UsageError(
            f"the classes and channels of data.dir={directory!r} are unknown here: the run has "
            f"no {RUN_INFO} and the folder is not prepared; train with it first"
        )
    return prepared.image_shape, prepared.num_classes


# ----------------------------------------------------------------------------- a run's record

RUN_INFO = "folder.json"  # in a run's workdir: classes, channels, shape, skipped files
REPORT = "unreadable.json"  # in a run's workdir: the unreadable files found by the preparation


def read_run_info(workdir: str | None) -> dict | None:
    """A run's ``folder.json`` (None when absent)."""
    if workdir is None:
        return None
    try:
        with open(os.path.join(workdir, RUN_INFO)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_run_info(workdir: str, prepared: PreparedFolder) -> None:
    """Records the folder's classes, channels, shape and skipped files in ``workdir``'s
    ``folder.json`` (process 0); nothing is rewritten when unchanged, a warning says when the
    folder's images changed."""
    if not is_writer():
        return
    info, before = prepared.info(), read_run_info(workdir)
    if before and before["cache"] != prepared.path:
        warn(f"the images of data.dir changed since this run last started ({before['cache']})")
    if before != json.loads(json.dumps(info)):
        write_json(os.path.join(workdir, RUN_INFO), info)


def write_report(workdir: str, unreadable: Sequence[tuple[str, str]], *, skipped: bool) -> str:
    """Writes the preparation report ``unreadable.json`` into ``workdir`` (process 0): every
    unreadable file with its reason, and whether the run skipped them. Returns its path."""
    path = os.path.join(workdir, REPORT)
    if is_writer():
        files = [{"path": p, "reason": r} for p, r in unreadable]
        write_json(path, {"skipped": skipped, "unreadable": files})
    return path


__all__ = [
    "FOLDER",
    "REPORT",
    "RUN_INFO",
    "FolderSource",
    "PreparedFolder",
    "UnreadableImagesError",
    "default_cache_dir",
    "open_cache",
    "folder_spec",
    "prepare_folder",
    "read_run_info",
    "write_report",
    "write_run_info",
]
