"""Image datasets as deterministic, per-process numpy batches (tfds / sklearn → grain).

Every batch is a pure function of ``(seed, step, process_index)``:

* The dataset is shuffled epoch by epoch: epoch ``e`` uses its own permutation, derived from
  ``seed`` and ``e`` (grain's ``MapDataset.shuffle`` followed by ``repeat``).
* The global batch of step ``s`` holds the examples at flat positions ``[s*B, (s+1)*B)`` of that
  endless shuffled stream (``B = global_batch_size``); batches run across epoch boundaries.
* Random horizontal flips are drawn per flat position (i.e. per ``(seed, epoch, example)``), so
  they do not depend on how many processes share the batch.
* Process ``p`` of ``P`` reads only rows ``[p*B/P, (p+1)*B/P)`` of every global batch.

A resumed run therefore sees exactly the data it would have seen, and the same global batch is
produced whatever the number of processes.

Sources: any tfds dataset with an ``image`` feature (and optionally a ``label`` ClassLabel), read
with ``tfds`` ArrayRecord data sources (no TensorFlow needed to read), and the embedded
``digits`` dataset (scikit-learn's 8×8 handwritten digits, offline). A tfds dataset that is not
prepared is prepared with tfds when possible; when it is not (no TensorFlow, no network), a
``DataUnavailableError`` with one paragraph of instructions is raised within seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

DIGITS = "digits"
_DIGITS_TEST_SIZE = 360

# Datasets whose images are invariant to a horizontal flip (flipped by default).
_FLIP_BY_DEFAULT = frozenset(
    {
        "cifar10",
        "cifar100",
        "celeb_a",
        "celeb_a_hq",
        "stl10",
        "lsun",
        "imagenet2012",
        "imagenet_resized",
        "downsampled_imagenet",
    }
)
# Download URLs for the error message when tfds cannot list them (it needs importlib_resources).
_KNOWN_DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",),
    "mnist": tuple(
        f"https://storage.googleapis.com/cvdf-datasets/mnist/{f}"
        for f in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    ),
}
# Modules that tfds needs to prepare (download, encode, write) a dataset; reading needs neither.
_PREPARE_MODULES = ("tensorflow", "importlib_resources")
_NETWORK_TIMEOUT_S = 3.0


class DataUnavailableError(RuntimeError):
    """The dataset is not prepared and cannot be prepared here; the message says what to do."""


# ----------------------------------------------------------------------------- digits


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), offline.

    The stratified split is ``train_test_split(arange(1797), test_size=360, random_state=0,
    stratify=labels)``: 1,437 train and 360 test examples, sorted by original index.

    Args:
      split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
      images: ``[N, 8, 8, 1]`` uint8, sklearn's 0..16 intensities mapped by ``round(v * 255 / 16)``.
      labels: ``[N]`` int32 in ``[0, 10)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is not valid for 'digits'; use 'train', 'test' or 'all'")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    if split == "all":
        return images, labels
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return images[idx], labels[idx]


class _ArraySource:
    """Random-access source over in-memory arrays: ``source[i] -> {"image", "label"}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}


# ----------------------------------------------------------------------------- tfds


def _base_name(name: str) -> str:
    """``"imagenet_resized/32x32:0.1.0"`` → ``"imagenet_resized"``."""
    return name.split("/")[0].split(":")[0]


def _download_urls(builder: Any, name: str) -> tuple[str, ...]:
    """The URLs tfds downloads to prepare ``name`` (empty when unknown)."""
    try:
        urls = tuple(builder.url_infos or ())
    except Exception:  # tfds needs importlib_resources to read its checksum files.
        urls = ()
    return urls or _KNOWN_DOWNLOADS.get(_base_name(name), ())


def _instructions(name: str, builder: Any, reason: str) -> str:
    """One paragraph (one line) saying why ``name`` is unavailable and exactly what to do."""
    urls = _download_urls(builder, name)
    if urls:
        names = [os.path.basename(urllib.parse.urlparse(u).path) for u in urls]
        files = " and ".join(f"{n} ({u})" for n, u in zip(names, urls, strict=True))
        offline = (
            f"offline, download {files} on another machine, put "
            f"{'them' if len(urls) > 1 else 'it'} unextracted in a directory and pass "
            "--config.data.manual_dir=<that directory>"
        )
    else:
        offline = (
            "offline, put the original files listed in the tfds catalog for "
            f"{name!r} in a directory and pass --config.data.manual_dir=<that directory>"
        )
    return (
        f"Dataset {name!r} is not prepared in {builder.data_dir} and cannot be prepared here: "
        f'{reason}. To fix: install the preparation tools with `pip install -e ".[prepare]"` '
        "(TensorFlow is needed once, to prepare; training reads the ArrayRecord files without "
        f"it), then either rerun with network access (tfds downloads and prepares {name!r}) or, "
        f"{offline}; --config.data.data_dir=<dir> chooses where prepared datasets are written and "
        f"read (a directory already holding a prepared {name!r}, e.g. copied from another "
        "machine, works without any preparation)."
    )


@contextlib.contextmanager
def _quiet_absl():
    """Hides tfds' absl warnings (errors still show) while probing a dataset directory."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _missing_prepare_modules() -> list[str]:
    """Modules tfds needs to prepare datasets that are not importable (a cheap check)."""
    return [m for m in _PREPARE_MODULES if importlib.util.find_spec(m) is None]


def _network_reachable(host: str, port: int = 443, timeout: float = _NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS included)."""
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout.
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _prepare(builder: Any, name: str, manual_dir: str | None) -> None:
    """Downloads and prepares ``builder`` as ArrayRecord, or raises DataUnavailableError fast."""
    missing = _missing_prepare_modules()
    if missing:
        raise DataUnavailableError(
            _instructions(name, builder, f"{', '.join(missing)} not installed (needed to prepare)")
        )
    urls = _download_urls(builder, name)
    files = [os.path.basename(urllib.parse.urlparse(u).path) for u in urls]
    have_manual = bool(
        manual_dir and files and all(os.path.exists(os.path.join(manual_dir, f)) for f in files)
    )
    if not have_manual:
        host = urllib.parse.urlparse(urls[0]).hostname if urls else "storage.googleapis.com"
        if not _network_reachable(host):
            where = f" and not all of {files} are in manual_dir={manual_dir}" if files else ""
            raise DataUnavailableError(_instructions(name, builder, f"{host} unreachable{where}"))
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=not have_manual
            ),
        )
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataUnavailableError(
            _instructions(name, builder, f"preparing failed with {type(e).__name__}: {detail}")
        ) from e


def load_tfds_source(
    name: str, *, split: str, data_dir: str | None = None, manual_dir: str | None = None
) -> tuple[Sequence[dict[str, Any]], int | None]:
    """A tfds ArrayRecord data source for ``name``/``split``, preparing the dataset if needed.

    Args:
      name: tfds name, optionally with config / version (``"cifar10"``, ``"mnist"``).
      split: tfds split string (``"train"``, ``"test"``, ``"train[:90%]"``).
      data_dir: tfds data directory; None is tfds' default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      manual_dir: directory holding the original download archives, for offline preparation.

    Returns:
      ``(source, num_classes)``: ``source[i]`` is a dict with ``"image"`` uint8 ``[H, W, C]`` and
      maybe ``"label"``; ``num_classes`` is None when the dataset has no ``label`` ClassLabel.

    Raises:
      ValueError: unknown dataset, no ``image`` feature, or an invalid split.
      DataUnavailableError: not prepared and cannot be prepared here (fast, before anything slow).
    """
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"name={name!r} is not a usable tfds dataset ({first}); use {DIGITS!r} or a tfds "
            "image dataset name such as 'cifar10', 'mnist' or 'fashion_mnist'"
        ) from e
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(f"name={name!r}: the tfds dataset has no 'image' feature")
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    with _quiet_absl():  # tfds warns "Variant folder ... has no dataset_info.json".
        prepared = builder.is_prepared()
    if not prepared:
        _prepare(builder, name, manual_dir)
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as e:  # prepared as TFRecord only: no random access.
        raise DataUnavailableError(
            f"Dataset {name!r} in {builder.data_dir} was prepared without ArrayRecord files, "
            "which random access needs: delete that directory (or choose another "
            "--config.data.data_dir) and rerun to prepare it again as ArrayRecord."
        ) from e
    except Exception as e:
        raise ValueError(
            f"split={split!r} cannot be read from tfds dataset {name!r} ({e}); available splits: "
            f"{sorted(builder.info.splits)}"
        ) from e
    return source, num_classes


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
    ):
        """Args: ``source[i]`` is a dict with ``"image"`` uint8 ``[H, W, C]`` (or ``[H, W]``) and
        optionally ``"label"``; the other arguments are those of ``make_dataset``."""
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
        self.image_shape = self._decode(source[0])["image"].shape
        shuffle_seed, flip_seed = (
            int(s) for s in np.random.SeedSequence(self.seed).generate_state(2)
        )
        ds = grain.MapDataset.source(source)
        if total < len(source):
            ds = ds.slice(slice(0, total))
        # shuffle-then-repeat: epoch e of the endless stream is permuted with seed shuffle_seed + e.
        ds = ds.shuffle(seed=shuffle_seed).repeat().map(self._decode)
        if self.random_flip:  # keyed by flat position = (epoch, position in epoch).
            ds = ds.random_map(_random_flip, seed=flip_seed)
        # Chunk k holds flat positions [k*b, (k+1)*b); global batch s = chunks s*P .. s*P+P-1.
        ds = ds.batch(self.local_batch_size).map(_to_float)
        self._batches = ds.slice(slice(self.process_index, None, self.process_count))

    def _decode(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(
                f"{self.name}: expected uint8 [H, W, C] images, got {image.dtype} {image.shape}"
            )
        if self._hw is not None and image.shape[:2] != self._hw:
            image = _resize(image, self._hw)
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

    def iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless iterator over ``batch(start_step), batch(start_step + 1), ...``.

        Batches are computed by ``num_threads`` worker threads and prefetched; the arrays are
        identical to those of ``batch``.
        """
        _check_int("start_step", start_step, 0)
        ds = self._batches.slice(slice(int(start_step), None))
        return iter(ds.to_iter_dataset(self._read_options))

    @property
    def steps_per_epoch(self) -> float:
        """Global steps per pass over the data (``num_examples / global_batch_size``)."""
        return self.num_examples / self.global_batch_size


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of a uint8 ``[H, W, C]`` image to ``hw``."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"image": example["image"][:, ::-1], "label": example["label"]}
    return example


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # exact ends
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
      ValueError: invalid arguments (each names the field) or an unknown dataset.
      DataUnavailableError: a tfds dataset that is not prepared and cannot be prepared here.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a dataset name such as 'cifar10' or 'digits'")
    if name == DIGITS:
        images, labels = digits_arrays(split)
        source, num_classes = _ArraySource(images, labels), 10
    else:
        source, num_classes = load_tfds_source(
            name, split=split, data_dir=data_dir, manual_dir=manual_dir
        )
    if random_flip is None:
        random_flip = _base_name(name) in _FLIP_BY_DEFAULT
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


__all__ = [
    "DIGITS",
    "DataUnavailableError",
    "ImageDataset",
    "digits_arrays",
    "load_tfds_source",
    "make_dataset",
]
