"""Image datasets as deterministic, per-process numpy batches (tfds / sklearn → grain).

Every batch is a pure function of ``(seed, step, process_index)``:

* The dataset is shuffled epoch by epoch: epoch ``e`` uses its own permutation, derived from
  ``seed`` and ``e`` (grain's ``MapDataset.shuffle`` followed by ``repeat``).
* The global batch of step ``s`` holds the examples at flat positions ``[s*B, (s+1)*B)`` of that
  endless shuffled stream (``B = global_batch_size``); batches run across epoch boundaries.
* Random horizontal flips are drawn per flat position (i.e. per ``(seed, epoch, example)``), so
  they do not depend on how many processes share the batch.
* Process ``p`` of ``P`` reads only rows ``[p*B/P, (p+1)*B/P)`` of every global batch.
* A run whose batch size changed continues the same stream from the examples it consumed
  (``iterator(step, examples_seen=...)``): no example of the epoch is skipped or repeated.

A resumed run therefore sees exactly the data it would have seen, and the same global batch is
produced whatever the number of processes.

Every training dataset implements the :class:`Dataset` protocol with this batching:
:class:`ImageDataset` over a random-access source, built by :func:`make_dataset` (any tfds dataset
with an ``image`` feature, through :mod:`ddpm_jax.tfds_source`, or the embedded ``digits``:
scikit-learn's 8×8 handwritten digits, offline) or by :func:`array_dataset` (in-memory arrays,
e.g. the encoded latents of a latent-diffusion run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from ddpm_jax import images as images_lib
from ddpm_jax.digits_source import DIGITS, ArraySource, digits_arrays
from ddpm_jax.errors import UsageError
from ddpm_jax.tfds_source import DataUnavailableError, base_name, load_tfds_source, tfds_image_spec

# Datasets whose images are invariant to a horizontal flip (flipped by default).
_FLIP_BY_DEFAULT = frozenset(
    "cifar10 cifar100 celeb_a celeb_a_hq stl10 lsun imagenet2012 imagenet_resized "
    "downsampled_imagenet".split()
)


class Dataset(Protocol):
    """What the run loop needs of a training dataset.

    Attributes:
      name: dataset name.
      image_shape: ``(H, W, C)`` of the produced examples.
      num_classes: number of label classes, or None when the examples have no labels.
      num_examples: examples per epoch.
      global_batch_size / local_batch_size: rows per global batch / per process.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int | None
    num_examples: int
    global_batch_size: int
    local_batch_size: int

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: ``{"image": float32 [local_B, H, W, C],
        "label": int32 [local_B]}`` (labels -1 without classes); a pure function of ``step``."""
        ...

    def iterator(
        self, start_step: int = 0, *, examples_seen: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """``batch(start_step), batch(start_step + 1), ...``; with ``examples_seen``, the batches
        of the same stream that start at that flat position (a run whose batch size changed)."""
        ...


# ----------------------------------------------------------------------------- pipeline


def _as_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    scalar = isinstance(image_size, int | np.integer)
    hw = (image_size, image_size) if scalar else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in hw):
        raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width)")
    return int(hw[0]), int(hw[1])


def _check_int(field: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an integer >= {minimum}")


class ImageDataset:
    """Deterministic, per-process batches of an image dataset (see the module docstring).

    Attributes:
      name: dataset name.
      image_shape: ``(H, W, C)`` of the produced images (after the optional resize).
      num_classes: number of label classes, or None when the dataset has no labels.
      num_examples: examples per epoch.
      global_batch_size / local_batch_size: rows per global batch / per process.
      process_index / process_count: this process's slice of every global batch.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        *,
        name: str,
        num_classes: int | None,
        global_batch_size: int,
        seed: int,
        random_flip: bool = False,
        image_size: int | Sequence[int] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_examples: int | None = None,
        num_threads: int = 4,
        prefetch_batches: int = 8,
        augment: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
    ):
        """Args: ``source[i]`` is a dict with ``"image"`` uint8 ``[H, W, C]`` (or ``[H, W]``; mapped
        to [-1, 1]) or float32 ``[H, W, C]`` (used as is, e.g. latents) and optionally
        ``"label"``; ``augment(example, rng)`` an optional random transform of the source's
        examples (e.g. a folder's random crop), drawn per flat position like the flips; the
        other arguments are those of ``make_dataset``."""
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        _check_int("process_count", process_count, 1)
        _check_int("process_index", process_index, 0)
        if process_index >= process_count:
            raise ValueError(f"process_index={process_index} must be < {process_count=}")
        _check_int("global_batch_size", global_batch_size, 1)
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be divisible by "
                f"process_count={process_count}"
            )
        _check_int("seed", seed, 0)
        _check_int("num_threads", num_threads, 1)
        _check_int("prefetch_batches", prefetch_batches, 1)
        total = len(source)
        if num_examples is not None:
            _check_int("num_examples", num_examples, 1)
            total = min(total, num_examples)
        if total == 0:
            raise ValueError(f"dataset {name!r} has no examples")
        self.name = name
        self.num_classes = num_classes
        self.num_examples = total
        self.random_flip = bool(random_flip)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed = int(seed)
        self._hw = _as_hw(image_size)
        self._read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads)
        )
        self.image_shape = None
        first = source[0] if augment is None else augment(source[0], np.random.default_rng(0))
        self.image_shape = self._decode(first)["image"].shape
        # generate_state(n)[:2] does not depend on n: the streams without augment are unchanged.
        shuffle_seed, flip_seed, augment_seed = (
            int(s) for s in np.random.SeedSequence(self.seed).generate_state(3)
        )
        ds = grain.MapDataset.source(source)
        if total < len(source):
            ds = ds.slice(slice(0, total))
        # shuffle-then-repeat: epoch e of the endless stream is permuted with seed shuffle_seed + e.
        ds = ds.shuffle(seed=shuffle_seed).repeat()
        if augment is not None:  # keyed by flat position, as the flips
            ds = ds.random_map(augment, seed=augment_seed)
        ds = ds.map(self._decode)
        if self.random_flip:  # keyed by flat position = (epoch, position in epoch).
            ds = ds.random_map(_random_flip, seed=flip_seed)
        self._examples = ds  # the endless stream, one example per flat position
        self._batches = self._batched(ds)

    def _batched(self, examples: grain.MapDataset) -> grain.MapDataset:
        """Chunk k of ``examples`` holds positions [k*b, (k+1)*b); global batch s = chunks
        s*P .. s*P+P-1, of which this process takes chunk s*P+p."""
        ds = examples.batch(self.local_batch_size).map(_to_float)
        return ds.slice(slice(self.process_index, None, self.process_count))

    def _decode(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype not in (np.uint8, np.float32) or image.ndim != 3:
            raise ValueError(
                f"{self.name}: expected uint8 or float32 [H, W, C] images, got {image.dtype} "
                f"{image.shape}"
            )
        if self._hw is not None and image.shape[:2] != self._hw:
            if image.dtype != np.uint8:
                raise ValueError(f"{self.name}: image_size resizes uint8 images only")
            image = images_lib.resize(image, self._hw)
        if self.image_shape is not None and image.shape != self.image_shape:
            raise ValueError(
                f"{self.name}: image of shape {image.shape} differs from {self.image_shape}; set "
                "image_size to resize images of varying sizes"
            )
        label = np.int32(example["label"]) if "label" in example else np.int32(-1)
        return {"image": image, "label": label}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch of ``step`` (a pure function of it).

        Returns:
          ``{"image": [local_B, H, W, C] float32 in [-1, 1], "label": [local_B] int32}``; labels
          are -1 when the dataset has none.
        """
        _check_int("step", step, 0)
        return self._batches[int(step)]

    def iterator(
        self, start_step: int = 0, *, examples_seen: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless iterator over ``batch(start_step), batch(start_step + 1), ...``.

        Batches are computed by ``num_threads`` worker threads and prefetched; the arrays are
        identical to those of ``batch``.

        Args:
          start_step: the step of the first batch.
          examples_seen: the flat position of the first batch's first example (the examples a
            run consumed before ``start_step``, which differs from ``start_step * B`` once its
            batch size changed); the k-th batch then holds positions ``[examples_seen + k*B,
            examples_seen + (k+1)*B)``. None: ``start_step * B``.
        """
        _check_int("start_step", start_step, 0)
        b = self.global_batch_size
        if examples_seen is None or examples_seen == start_step * b:
            ds = self._batches.slice(slice(int(start_step), None))
        else:
            _check_int("examples_seen", examples_seen, 0)
            ds = self._batched(self._examples.slice(slice(int(examples_seen), None)))
        return iter(ds.to_iter_dataset(self._read_options))

    @property
    def steps_per_epoch(self) -> float:
        """Global steps per pass over the data (``num_examples / global_batch_size``)."""
        return self.num_examples / self.global_batch_size


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"image": example["image"][:, ::-1], "label": example["label"]}
    return example


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = batch["image"]
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # exact ends
    return {"image": image, "label": batch["label"].astype(np.int32)}


def make_dataset(
    name: str,
    *,
    split: str = "train",
    global_batch_size: int,
    seed: int,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    random_flip: bool | None = None,
    image_size: int | Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_examples: int | None = None,
    num_threads: int = 4,
    prefetch_batches: int = 8,
) -> ImageDataset:
    """Builds the deterministic per-process batch pipeline for an image dataset.

    Args:
      name: ``"digits"`` (embedded, offline) or a tfds image dataset (``"cifar10"``, ``"mnist"``).
      split: ``"train"`` / ``"test"`` (``"all"`` for digits; any tfds split string for tfds).
      global_batch_size: rows of every global batch, summed over processes.
      seed: data seed (shuffle order and flips), an integer >= 0.
      data_dir: tfds data directory (None: tfds' default).
      manual_dir: directory holding the original archives for offline preparation.
      random_flip: random horizontal flips; None uses the dataset default (True for natural
        images such as cifar10, False for digits, mnist and other datasets).
      image_size: optional resize to ``size`` or ``(height, width)`` (bilinear).
      process_index / process_count: this process's slice; None uses jax's.
      num_examples: optional cap on examples per epoch (the first ones of the split).
      num_threads / prefetch_batches: worker threads and prefetched batches of ``iterator``.

    Returns:
      An ``ImageDataset``.

    Raises:
      ValueError: invalid arguments (each names the field).
      UsageError: an unknown dataset or split.
      DataUnavailableError: a tfds dataset that is not prepared and cannot be prepared here.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"name={name!r} must be a dataset name such as 'cifar10' or 'digits'")
    if name == DIGITS:
        images, labels = digits_arrays(split)
        source, num_classes = ArraySource(images, labels), 10
    else:
        source, num_classes = load_tfds_source(
            name, split=split, data_dir=data_dir, manual_dir=manual_dir
        )
    if random_flip is None:
        random_flip = base_name(name) in _FLIP_BY_DEFAULT
    return ImageDataset(
        source,
        name=name,
        num_classes=num_classes,
        global_batch_size=global_batch_size,
        seed=seed,
        random_flip=random_flip,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
        num_examples=num_examples,
        num_threads=num_threads,
        prefetch_batches=prefetch_batches,
    )


def array_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None,
    global_batch_size: int,
    seed: int,
    name: str = "arrays",
    process_index: int | None = None,
    process_count: int | None = None,
) -> ImageDataset:
    """The batches of in-memory examples, with the batching of every other dataset.

    Args:
      images: ``[N, H, W, C]`` uint8 images (mapped to [-1, 1]) or float32 arrays used as they are
        (e.g. the scaled latents of a latent-diffusion run).
      labels: ``[N]`` int32 labels in ``[0, num_classes)`` (or -1 for none).
      num_classes: number of classes, or None.
      global_batch_size / seed / process_index / process_count: as :func:`make_dataset`.
      name: the dataset's name.

    Returns:
      An :class:`ImageDataset` (no flips, no resizing).
    """
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"images [N, H, W, C] and labels [N] expected, got {images.shape} and {labels.shape}"
        )
    if (
        num_classes is not None
        and len(labels)
        and not 0 <= labels.min() <= labels.max() < num_classes
    ):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes})")
    return ImageDataset(
        ArraySource(images, labels),
        name=name,
        num_classes=num_classes,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def image_spec(
    name: str, *, data_dir: str | None = None, image_size: int | None = None
) -> tuple[tuple[int, int, int], int | None]:
    """``((H, W, C), num_classes)`` of the examples :func:`make_dataset` would produce, from the
    dataset's metadata alone (no data is read, prepared or downloaded).

    Raises:
      UsageError: an unknown dataset, or varying image sizes without ``image_size``.
    """
    if name == DIGITS:
        shape, num_classes = (8, 8, 1), 10
    else:
        shape, num_classes = tfds_image_spec(name, data_dir)
    h, w, c = shape
    if image_size is not None:
        h, w = _as_hw(image_size)
    if h is None or w is None or c is None:
        raise UsageError(
            f"data.name={name!r} has images of varying size {shape}: set config.data.image_size"
        )
    return (int(h), int(w), int(c)), num_classes


__all__ = [
    "DIGITS",
    "DataUnavailableError",
    "Dataset",
    "ImageDataset",
    "array_dataset",
    "digits_arrays",
    "image_spec",
    "load_tfds_source",
    "make_dataset",
]
