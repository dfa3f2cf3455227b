"""tfds image datasets as random-access ArrayRecord sources, prepared on demand or refused fast.

:func:`load_tfds_source` returns a tfds data source (read without TensorFlow) for any tfds dataset
with an ``image`` feature. A dataset that is not prepared is prepared with tfds when possible;
when it is not (no TensorFlow, no network), a :class:`DataUnavailableError` with one paragraph of
instructions is raised within seconds. :func:`tfds_image_spec` gives a dataset's image shape and
class count from its metadata alone, without reading or preparing any data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import tarfile
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from ddpm_jax.errors import UsageError

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


class DataUnavailableError(UsageError):
    """The dataset is not prepared and cannot be prepared here; the message says what to do."""


def base_name(name: str) -> str:
    """``"imagenet_resized/32x32:0.1.0"`` → ``"imagenet_resized"``."""
    return name.split("/")[0].split(":")[0]


def _download_urls(builder: Any, name: str) -> tuple[str, ...]:
    """The URLs tfds downloads to prepare ``name`` (empty when unknown)."""
    try:
        urls = tuple(builder.url_infos or ())
    except Exception:  # tfds needs importlib_resources to read its checksum files.
        urls = ()
    return urls or _KNOWN_DOWNLOADS.get(base_name(name), ())


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


_PREPARE_FAILURES = (
    tfds.download.DownloadError,
    download_manager.NonMatchingChecksumError,
    tarfile.TarError,
    EOFError,
    OSError,
    AssertionError,
)


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
    # What preparing without network, with missing or damaged manual files raises (tfds asserts
    # the manual directory; a damaged archive fails its checksum or tarfile); anything else is a
    # bug and keeps its traceback.
    except _PREPARE_FAILURES as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataUnavailableError(
            _instructions(name, builder, f"preparing failed with {type(e).__name__}: {detail}")
        ) from e


def _image_builder(name: str, data_dir: str | None) -> tuple[Any, int | None]:
    """The tfds builder of an image dataset and its class count (None without class labels)."""
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"data.name={name!r} is not a usable tfds dataset ({first}); use 'digits' or a tfds "
            "image dataset name such as 'cifar10', 'mnist' or 'fashion_mnist'"
        ) from e
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise UsageError(f"data.name={name!r}: the tfds dataset has no 'image' feature")
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    return builder, num_classes


def tfds_image_spec(
    name: str, data_dir: str | None = None
) -> tuple[tuple[int | None, int | None, int | None], int | None]:
    """``((H, W, C), num_classes)`` of a tfds image dataset from its metadata; no data is read.

    Sides are None for datasets of varying image sizes.
    """
    builder, num_classes = _image_builder(name, data_dir)
    return tuple(builder.info.features["image"].shape), num_classes


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
      UsageError: unknown dataset, no ``image`` feature, or an invalid split.
      DataUnavailableError: not prepared and cannot be prepared here (fast, before anything slow).
    """
    builder, num_classes = _image_builder(name, data_dir)
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
    except (KeyError, ValueError) as e:  # no such split
        raise UsageError(
            f"split={split!r} cannot be read from tfds dataset {name!r} ({e}); available splits: "
            f"{sorted(builder.info.splits)}"
        ) from e
    return source, num_classes


__all__ = ["DataUnavailableError", "base_name", "load_tfds_source", "tfds_image_spec"]
