"""Scoring generated images against a dataset split.

- :class:`Evaluator` scores uint8 images against cached reference statistics of a dataset's
  training split (:mod:`ddpm_jax.evaluation.reference`): digits-FID, -KID and class accuracy
  with the digits classifier's features for ``"digits"``; FID, KID and Inception Score with the
  FID Inception network for any other dataset. It needs no run: the training loop can build one
  from the dataset's name and the generated images' shape. :meth:`Evaluator.floor` scores the
  held-out test split the same way (what a perfect model would get, up to the sample size).

Sampling a trained run and scoring it is :mod:`ddpm_jax.evaluation.sweep` (used by
``experiments.evaluate``); the training loop scores with :mod:`ddpm_jax.evaluation.during_training`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from ddpm_jax import data
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import metrics
from ddpm_jax.evaluation.reference import (
    REFERENCE_BATCH,
    Extractor,
    digits_extractor,
    inception_extractor,
    reference_name,
    reference_path,
    reference_stats,
    split_images,
)
from ddpm_jax.workdir import log

# The metrics a score can hold, in the order tables show them (``kid_std`` and
# ``inception_score_std`` accompany ``kid_mean`` and ``inception_score``).
METRICS = ("fid", "kid_mean", "accuracy", "inception_score")


class Evaluator:
    """Scores generated images against reference statistics of a dataset's training split.

    The statistics are loaded from ``cache_dir`` or computed once from the split (the dataset is
    read only then), at the generated images' size.

    Args:
      dataset: the dataset's name (``"digits"``, ``"cifar10"``, ...).
      image_shape: ``(H, W, C)`` of the generated images; the reference images are resized to it.
      data_dir / manual_dir: where the tfds dataset is (or is prepared from); a folder's cache.
      extractor: the feature extractor (default: :func:`digits_extractor` for digits, else
        :func:`inception_extractor` with ``inception_path``).
      inception_path: FID Inception weights (None: the cached download).
      cache_dir: where reference statistics are cached (None: ``default_cache_dir()``).
      kid_num_subsets / kid_subset_size: KID estimator settings.
      verbose: print where the reference statistics came from.

    Raises:
      UsageError: unknown dataset, data that is not prepared on a cache miss, missing weights.
    """

    def __init__(
        self,
        dataset: str,
        image_shape: Sequence[int],
        *,
        data_dir: str | None = None,
        manual_dir: str | None = None,
        extractor: Extractor | None = None,
        inception_path: str | None = None,
        cache_dir: str | None = None,
        kid_num_subsets: int = 100,
        kid_subset_size: int = 1000,
        verbose: bool = True,
    ):
        self.dataset, self.image_shape = dataset, tuple(int(s) for s in image_shape)
        self.data_dir, self.manual_dir = data_dir, manual_dir
        self.kid_num_subsets, self.kid_subset_size = kid_num_subsets, kid_subset_size
        if extractor is None:
            if dataset == data.DIGITS:
                extractor = digits_extractor()
            else:
                extractor = inception_extractor(inception_path)
        self.extractor = extractor
        self.cache_path = reference_path(
            reference_name(dataset, data_dir),
            split="train",
            image_shape=self.image_shape,
            extractor=extractor.name,
            cache_dir=cache_dir,
        )
        t0 = time.time()
        self.reference, self.reference_cached = reference_stats(
            extractor, lambda: self.split_images("train"), self.cache_path
        )
        self.reference_s = time.time() - t0
        how = "loaded" if self.reference_cached else "computed and cached"
        if verbose:
            log(f"reference statistics ({self.reference.count} images) {how}: {self.cache_path}")

    def split_images(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``split_images`` of this dataset's ``split`` at the generated images' size.

        Raises:
          UsageError: the dataset's images have another number of channels.
        """
        for x, y in split_images(
            self.dataset,
            split,
            data_dir=self.data_dir,
            manual_dir=self.manual_dir,
            image_size=self.image_shape[:2],
        ):
            if x.shape[1:] != self.image_shape:
                raise UsageError(
                    f"dataset {self.dataset!r} has images of shape {x.shape[1:]}, the generated "
                    f"images {self.image_shape}: their channels differ"
                )
            yield x, y

    def score(self, imgs: np.ndarray, classes: np.ndarray | None = None) -> dict[str, float]:
        """FID, KID and class accuracy (class features, all classes >= 0) or Inception Score.

        Args:
          imgs: ``[N, H, W, C]`` uint8, N >= 2.
          classes: ``[N]`` int32 dataset class each image was asked to show (-1: none).

        Returns:
          ``{"fid", "kid_mean", "kid_std"}`` plus ``"accuracy"`` or ``"inception_score",
          "inception_score_std"``.
        """
        if imgs.shape[1:] != self.image_shape:
            raise ValueError(f"imgs of shape {imgs.shape}; expected [N, *{self.image_shape}]")
        feats, probs = [], []
        for start in range(0, imgs.shape[0], REFERENCE_BATCH):
            f, p = self.extractor.fn(imgs[start : start + REFERENCE_BATCH])
            feats.append(np.asarray(f))
            probs.append(np.asarray(p))
        feats, probs = np.concatenate(feats), np.concatenate(probs)
        stats = metrics.RunningStats.init(self.extractor.dim).update(feats)
        ref = self.reference
        out = {"fid": metrics.frechet_distance(*stats.mean_cov(), ref.mean, ref.cov)}
        out["kid_mean"], out["kid_std"] = metrics.kid(
            feats,
            ref.kid_features,
            num_subsets=self.kid_num_subsets,
            subset_size=self.kid_subset_size,
        )
        if self.extractor.classes:
            if classes is not None and np.all(np.asarray(classes) >= 0):
                out["accuracy"] = float(np.mean(probs.argmax(-1) == np.asarray(classes)))
        else:
            splits = min(10, probs.shape[0])
            out["inception_score"], out["inception_score_std"] = metrics.inception_score(
                probs, splits=splits
            )
        return out

    def floor(self) -> dict:
        """The metrics of the held-out test split (true classes) against the training split.

        Returns:
          ``{"split": "test", "num_images", "metrics", "seconds"}``.
        """
        t0 = time.time()
        batches = list(self.split_images("test"))
        imgs = np.concatenate([b[0] for b in batches])
        classes = np.concatenate([b[1] for b in batches])
        return {
            "split": "test",
            "num_images": int(imgs.shape[0]),
            "metrics": self.score(imgs, classes),
            "seconds": time.time() - t0,
        }


__all__ = ["METRICS", "Evaluator"]
