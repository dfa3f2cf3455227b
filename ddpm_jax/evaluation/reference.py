"""Reference statistics of a dataset split: feature extractors, the split's images, the cache.

FID and KID compare features of generated images with features of real images. This module gives

- the feature extractors (:class:`Extractor`): the digits classifier's 128-d features
  (:func:`digits_extractor`, for the 8x8 digits and their upsampled versions) and the FID
  Inception network of pytorch-fid (:func:`inception_extractor`, any other dataset);
- the real images: one pass over a split of a dataset as uint8 batches at a given image size
  (:func:`split_images`);
- their statistics (:class:`ReferenceStats`: mean, covariance, count and a subset of the features
  for KID), computed once per dataset, split, image size and extractor and cached as ``.npz``
  (:func:`reference_stats`, :func:`reference_path`, :func:`default_cache_dir`). A cached file is
  read without touching the dataset, so a run can be evaluated where its data is not prepared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from ddpm_jax import data, folder_source, images
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import digits_classifier as digits_lib, metrics
from ddpm_jax.workdir import is_writer, save_npz

KID_REFERENCE_ROWS = 5000  # reference features kept in the cache for KID
REFERENCE_BATCH = 500  # images per batch of a split (and per extractor call)

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- extractors


@dataclasses.dataclass(frozen=True)
class Extractor:
    """A feature extractor for FID / KID.

    Attributes:
      name: identifies the network and its weights (part of the cache file name).
      dim: feature dimension D.
      fn: ``fn(images uint8 [N, H, W, C]) -> (features [N, D], probs [N, K])``.
      classes: True when ``probs`` are over the dataset's classes (class accuracy), False when
        they are Inception's ImageNet classes (Inception Score).
    """

    name: str
    dim: int
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    classes: bool


def digits_extractor(
    classifier: digits_lib.DigitsClassifier | None = None, *, seed: int = 0
) -> Extractor:
    """The digits classifier's 128-d features and class probabilities, for images of any size.

    Images that are not 8x8 (e.g. the 16x16 or 32x32 samples of a latent digits run) are resized
    to 8x8 first (:func:`ddpm_jax.images.resize`: bilinear, antialiased), as the classifier
    was trained on the native 8x8 digits.

    Args:
      classifier: a trained classifier; None trains one with ``seed`` (seconds, deterministic).
      seed: the training seed when ``classifier`` is None.

    Returns:
      An :class:`Extractor` whose name holds a hash of the classifier's parameters, so cached
      reference statistics are never reused with another classifier. Its ``fn`` takes uint8
      ``[N, H, W, 1]``.
    """
    if classifier is None:
        classifier = digits_lib.train_digits_classifier(seed=seed)
    leaves = jax.tree.leaves(classifier.params)
    digest = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in leaves))

    def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        if x.ndim == 4 and x.shape[1:3] != (8, 8):
            x = images.resize(x, (8, 8))
        return classifier.features(x), classifier.predict_proba(x)

    return Extractor(
        name=f"digits_cnn-{digest.hexdigest()[:10]}",
        dim=digits_lib.NUM_FEATURES,
        fn=features,
        classes=True,
    )


def inception_extractor(path: str | None) -> Extractor:
    """The FID Inception network of pytorch-fid from its ``.pth`` weights (None: download).

    Grayscale images are repeated to 3 channels; probabilities are the softmax of the logits.

    Args:
      path: ``pt_inception-2015-12-05-6726825d.pth``, or None for the cached download.

    Returns:
      An :class:`Extractor` of 2048-d features and 1008 ImageNet-class probabilities.

    Raises:
      UsageError: ``path`` is not a file, or the weights cannot be read or downloaded.
    """
    from ddpm_jax.weights import fid_inception  # the weights package only when Inception is used

    if path is not None and not os.path.isfile(path):
        raise UsageError(
            f"inception_path={path!r} is not a file; pass the pytorch-fid weights "
            f"{fid_inception.FID_WEIGHTS_NAME}"
        )
    fn = fid_inception.inception_from_pth(path, with_logits=True)

    def features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        f, logits = fn(x)
        return np.asarray(f), np.asarray(jax.nn.softmax(np.asarray(logits, np.float64)))

    return Extractor(name="inception_pt_2015_12_05", dim=2048, fn=features, classes=False)


# ----------------------------------------------------------------------------- real images


def split_images(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    image_size: int | Sequence[int] | None = None,
) -> Batches:
    """Batches of one pass over ``split`` of a dataset (the remainder of a tfds split is dropped).

    Args:
      name: ``"digits"``, ``"folder"`` or a tfds image dataset (``"cifar10"``).
      split: ``"train"``, ``"test"`` (any tfds split string for tfds; a folder has ``"train"``).
      data_dir / manual_dir: tfds data directory and directory of the original archives; for a
        folder, the prepared cache folder (``ddpm_jax.folder_source``).
      image_size: resize to ``size`` or ``(height, width)`` (bilinear); None keeps the dataset's.

    Yields:
      ``(images uint8 [B, H, W, C], labels int32 [B])`` (labels -1 without classes).

    Raises:
      UsageError: an unknown dataset or split; ``DataUnavailableError`` when a tfds dataset is not
        prepared and cannot be prepared here (raised at the first batch).
    """
    if name == folder_source.FOLDER:
        yield from _folder_images(data_dir, split, image_size)
        return
    if name == data.DIGITS:
        x, y = data.digits_arrays(split)
        if image_size is not None:
            hw = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
            if tuple(hw) != x.shape[1:3]:
                x = images.resize(x, hw)
        yield x, y
        return

    def make(batch: int) -> data.ImageDataset:
        return data.make_dataset(
            name,
            split=split,
            global_batch_size=batch,
            seed=0,
            data_dir=data_dir,
            manual_dir=manual_dir,
            random_flip=False,
            image_size=image_size,
            process_index=0,
            process_count=1,
        )

    ds = make(REFERENCE_BATCH)
    batch = min(REFERENCE_BATCH, ds.num_examples)
    if batch != REFERENCE_BATCH:
        ds = make(batch)
    for step in range(ds.num_examples // batch):  # one epoch
        b = ds.batch(step)
        yield images.to_uint8(b["image"]), b["label"]


def _folder_images(cache: str | None, split: str, image_size) -> Batches:
    """One pass over the prepared images of a folder (``cache``: the prepared cache folder),
    the centre window of each (a random-crop cache stores the short side only)."""
    if split != "train":
        raise UsageError(f"a folder dataset has only its images (split='train'), not {split!r}")
    source = folder_source.open_cache(cache or "")
    for start in range(0, len(source), REFERENCE_BATCH):
        examples = [source[i] for i in range(start, min(start + REFERENCE_BATCH, len(source)))]
        x = []
        for e in examples:
            h, w = e["image"].shape[:2]
            s = min(h, w)
            x.append(e["image"][(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
        x = np.stack(x)
        if image_size is not None:
            hw = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
            x = x if tuple(hw) == x.shape[1:3] else images.resize(x, hw)
        yield x, np.asarray([e["label"] for e in examples], np.int32)


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a data split (float64) and a subset of its features for KID.

    Attributes:
      mean: ``[D]`` float64.
      cov: ``[D, D]`` float64 (unbiased, as ``np.cov``).
      count: number of images.
      extractor: the :attr:`Extractor.name` of the features.
      kid_features: ``[M, D]`` float32, ``M <= 5000`` rows drawn without replacement.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int
    extractor: str
    kid_features: np.ndarray


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ddpm_jax/reference_stats`` (default ``~/.cache/ddpm_jax/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax", "reference_stats")


def reference_name(name: str, data_dir: str | None) -> str:
    """The name of a dataset's cached statistics: ``name``; a folder's names its prepared cache
    (``data_dir``), so each folder state has its own."""
    if name != folder_source.FOLDER:
        return name
    return f"folder_{os.path.basename(os.path.normpath(data_dir or 'unknown'))}"


def reference_path(
    name: str,
    *,
    split: str,
    image_shape: Sequence[int],
    extractor: str,
    cache_dir: str | None = None,
) -> str:
    """``<cache_dir>/<name>_<H>x<W>_<split>_<extractor>.npz`` (``/`` in names becomes ``_``).

    Args:
      name: the dataset's name.
      split: the split.
      image_shape: ``(H, W, ...)`` of the images the statistics are of.
      extractor: the extractor's name.
      cache_dir: the cache directory (None: :func:`default_cache_dir`).
    """
    h, w = image_shape[:2]
    file = f"{name.replace('/', '_')}_{h}x{w}_{split}_{extractor}.npz"
    return os.path.join(cache_dir or default_cache_dir(), file)


def reference_stats(
    extractor: Extractor,
    batches: Callable[[], Batches],
    cache_path: str,
) -> tuple[ReferenceStats, bool]:
    """Loads the reference statistics from ``cache_path``, or computes and caches them.

    A file written with another extractor is recomputed (and replaced). Only process 0 writes.

    Args:
      extractor: the feature extractor.
      batches: called (only on a cache miss) for ``(images uint8 [B, H, W, C], labels)``
        batches, e.g. ``lambda: split_images("cifar10", "train")``.
      cache_path: the ``.npz`` file (``mu, sigma, count, extractor, kid_features``).

    Returns:
      ``(stats, from_cache)``.
    """
    if os.path.exists(cache_path):
        with np.load(cache_path) as f:
            if str(f["extractor"]) == extractor.name:
                stats = ReferenceStats(
                    f["mu"], f["sigma"], int(f["count"]), extractor.name, f["kid_features"]
                )
                return stats, True
    running = metrics.RunningStats.init(extractor.dim)
    kept = []
    for x, _ in batches():
        feats = extractor.fn(x)[0]
        running = running.update(feats)
        kept.append(np.asarray(feats, np.float32))
    kid_features = np.concatenate(kept)
    if kid_features.shape[0] > KID_REFERENCE_ROWS:
        rows = np.random.default_rng(0).choice(kid_features.shape[0], KID_REFERENCE_ROWS, False)
        kid_features = kid_features[np.sort(rows)]
    mean, cov = running.mean_cov()
    stats = ReferenceStats(mean, cov, running.count, extractor.name, kid_features)
    if is_writer():
        save_npz(
            cache_path,
            mu=mean,
            sigma=cov,
            count=running.count,
            extractor=extractor.name,
            kid_features=kid_features,
        )
    return stats, False


__all__ = [
    "Extractor",
    "KID_REFERENCE_ROWS",
    "REFERENCE_BATCH",
    "ReferenceStats",
    "default_cache_dir",
    "digits_extractor",
    "inception_extractor",
    "reference_name",
    "reference_path",
    "reference_stats",
    "split_images",
]
