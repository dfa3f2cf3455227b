"""Scoring generated images against a dataset split, and sampling-and-scoring a trained run.

- :class:`Evaluator` scores uint8 images against cached reference statistics of a dataset's
  training split (:mod:`ddpm_jax.evaluation.reference`): digits-FID, -KID and class accuracy
  with the digits classifier's features for ``"digits"``; FID, KID and Inception Score with the
  FID Inception network for any other dataset. It needs no run: the training loop can build one
  from the dataset's name and the generated images' shape. :meth:`Evaluator.floor` scores the
  held-out test split the same way (what a perfect model would get, up to the sample size).
- :class:`RunEvaluator` samples a loaded run (:func:`ddpm_jax.runs.load_run`, pixel or latent,
  with a chosen sampler, number of steps and guidance scale, and scores the samples with an
  :class:`Evaluator` of the run's dataset at the run's output size (a latent digits run's 16x16
  samples against digits resized to 16x16; its prompts mapped to their classes).
- :func:`sweep` runs the metrics against the number of steps for each method and against the
  guidance scale (written by :func:`ddpm_jax.evaluation.report.write_sweep`).

Evaluation samples use the root key ``fold_in(fold_in(key(seed), EVAL_TAG), 0)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ddpm_jax import data, samplers
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
from ddpm_jax.generate import Generator, ProgressLine
from ddpm_jax.runs import LoadedRun
from ddpm_jax.workdir import EVAL_TAG, log, run_key

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


def check_sampling(
    num_timesteps: int,
    *,
    method: str,
    num_steps: int,
    guidance_scale: float,
    num_samples: int,
    eta: float = 0.0,
) -> None:
    """Raises UsageError naming the argument when a sampling setting is not allowed.

    Args:
      num_timesteps: the run's T (``num_steps`` must lie in ``[2, T]``).
      method / num_steps / guidance_scale / num_samples / eta: the setting.
    """
    T = num_timesteps
    if method not in samplers.METHODS:
        raise UsageError(f"method={method!r} is invalid: expected one of {list(samplers.METHODS)}")
    if not isinstance(num_steps, int) or not 2 <= num_steps <= T:
        raise UsageError(f"num_steps={num_steps!r} is invalid: expected an integer in [2, {T}]")
    if not guidance_scale >= 0:
        raise UsageError(f"guidance_scale={guidance_scale!r} is invalid: expected a number >= 0")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise UsageError(f"num_samples={num_samples!r} is invalid: expected an integer >= 2")
    if not eta >= 0:
        raise UsageError(f"eta={eta!r} is invalid: expected a number >= 0")


class RunEvaluator:
    """Samples from a loaded run's EMA parameters and scores the samples.

    The :class:`Evaluator` (attribute ``evaluator``) is of the run's dataset
    (``run.config.data``) at the run's output size (``run.output_shape``); accuracy compares the
    classifier's predictions with ``run.classes_of(labels)``.

    Args:
      run: from :func:`ddpm_jax.runs.load_run` or :func:`ddpm_jax.runs.load_pretrained`
        (which must name its training data).
      verbose: print progress.
      **evaluator_kwargs: ``extractor``, ``inception_path``, ``cache_dir``, ``kid_num_subsets``,
        ``kid_subset_size`` of the :class:`Evaluator`.
    """

    def __init__(self, run: LoadedRun, *, verbose: bool = True, **evaluator_kwargs: Any):
        d = run.data
        if d is None:
            raise UsageError(f"{run.path}: the dataset it was trained on is unknown (--dataset)")
        self.run, self.verbose = run, verbose
        self.evaluator = Evaluator(
            d.name,
            run.output_shape,
            data_dir=d.data_dir,
            manual_dir=d.manual_dir,
            verbose=verbose,
            **evaluator_kwargs,
        )
        self._generators: dict[tuple, Generator] = {}

    def sample(
        self,
        *,
        method: str,
        num_steps: int,
        guidance_scale: float,
        num_samples: int,
        eta: float = 0.0,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Samples one setting (each setting's generator keeps its compiled programs).

        Returns:
          ``(images uint8 [N, H, W, C], labels int32 [N], seconds)``; labels are the run's
          conditioning labels (see :meth:`ddpm_jax.runs.LoadedRun.classes_of`).
        """
        setting = dict(method=method, num_steps=num_steps, eta=float(eta))
        check_sampling(
            self.run.schedule.num_timesteps,
            num_samples=num_samples,
            guidance_scale=guidance_scale,
            **setting,
        )
        cache_key = tuple(setting.values())  # the scale is traced: no recompilation per scale
        if cache_key not in self._generators:
            self._generators[cache_key] = self.run.generator(**setting)
        key = jax.random.fold_in(run_key(seed, EVAL_TAG), 0)
        label = f"{method} {num_steps} steps, guidance {guidance_scale:g}"
        progress = ProgressLine(label, num_samples, self.verbose)
        t0 = time.time()
        imgs, labels = self._generators[cache_key](
            self.run.ema_params, key, num_samples, guidance_scale=guidance_scale, progress=progress
        )
        return imgs, labels, time.time() - t0

    def evaluate(
        self,
        *,
        method: str,
        num_steps: int,
        guidance_scale: float,
        num_samples: int,
        eta: float = 0.0,
        seed: int = 0,
    ) -> tuple[dict, np.ndarray]:
        """Samples and scores one setting.

        Returns:
          ``(report, images uint8 [N, H, W, C])``; the report holds the settings, ``metrics``
          (see :meth:`Evaluator.score`), ``timing`` (``sample_s``, ``images_per_s``,
          ``metrics_s``) and ``reference`` (``path``, ``count``, ``from_cache``).
        """
        imgs, labels, sample_s = self.sample(
            method=method,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            num_samples=num_samples,
            eta=eta,
            seed=seed,
        )
        t0 = time.time()
        ev = self.evaluator
        scores = ev.score(imgs, self.run.classes_of(labels))
        report = {
            "run": self.run.path,
            "checkpoint_step": self.run.step,
            "dataset": ev.dataset,
            "extractor": ev.extractor.name,
            "method": method,
            "num_steps": int(num_steps),
            "guidance_scale": float(guidance_scale),
            "eta": float(eta),
            "seed": int(seed),
            "num_samples": int(num_samples),
            "num_devices": self.run.dp.num_devices,
            "metrics": scores,
            "timing": {
                "sample_s": sample_s,
                "images_per_s": num_samples / max(sample_s, 1e-9),
                "metrics_s": time.time() - t0,
            },
            "reference": {
                "path": ev.cache_path,
                "count": ev.reference.count,
                "from_cache": ev.reference_cached,
            },
        }
        return report, imgs


# ----------------------------------------------------------------------------- sweeps


def parse_steps_spec(spec: str, num_timesteps: int) -> dict[str, list[int]]:
    """``"ddpm:full;ddim:10,20"`` -> ``{"ddpm": [T], "ddim": [10, 20]}`` (``full`` = T).

    Raises:
      UsageError: naming ``sweep_steps``.
    """
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        method, _, steps = part.partition(":")
        method = method.strip()
        if method not in samplers.METHODS or not steps.strip():
            raise UsageError(
                f"sweep_steps={spec!r} is invalid: expected 'method:steps,...;...' with methods "
                f"in {list(samplers.METHODS)}"
            )
        try:
            values = [num_timesteps if s.strip() == "full" else int(s) for s in steps.split(",")]
        except ValueError:
            raise UsageError(
                f"sweep_steps={spec!r} is invalid: steps must be integers or 'full'"
            ) from None
        out[method] = values
    if not out:
        raise UsageError(f"sweep_steps={spec!r} is invalid: it names no method")
    return out


def sweep(
    run_evaluator: RunEvaluator,
    *,
    steps: dict[str, Sequence[int]],
    guidance_scales: Sequence[float],
    guidance_scale: float,
    method: str,
    num_steps: int,
    num_samples: int,
    num_samples_for: Callable[[str, int], int] | None = None,
    eta: float = 0.0,
    seed: int = 0,
    floor: bool = True,
) -> dict:
    """Metrics against the number of steps per method, and against the guidance scale.

    Args:
      run_evaluator: a :class:`RunEvaluator`.
      steps: ``{method: [num_steps, ...]}`` of the steps sweep (at ``guidance_scale``).
      guidance_scales: scales of the guidance sweep (with ``method`` / ``num_steps``).
      guidance_scale: the steps sweep's scale.
      method / num_steps: the guidance sweep's sampler.
      num_samples: samples per cell; ``num_samples_for(method, steps)`` may lower it per cell.
      eta / seed: see :meth:`RunEvaluator.evaluate`.
      floor: also score the held-out test split.

    Returns:
      ``{"steps": [cell, ...], "guidance": [cell, ...], "floor": {...} | None, ...}``; each cell
      has ``method, num_steps, guidance_scale, num_samples, metrics, sample_s, images_per_s,
      metrics_s``.
    """
    run, evaluator = run_evaluator.run, run_evaluator.evaluator

    def cell(m: str, n: int, g: float) -> dict:
        count = num_samples if num_samples_for is None else num_samples_for(m, n)
        report, _ = run_evaluator.evaluate(
            method=m, num_steps=n, guidance_scale=g, num_samples=count, eta=eta, seed=seed
        )
        row = {k: report[k] for k in ("method", "num_steps", "guidance_scale", "num_samples")}
        row.update(metrics=report["metrics"], **report["timing"])
        if run_evaluator.verbose:
            log(f"  -> {json.dumps(row['metrics'])}  ({row['sample_s']:.1f} s sampling)")
        return row

    steps_rows = [cell(m, n, guidance_scale) for m, ns in steps.items() for n in ns]
    guidance_rows = [cell(method, num_steps, float(g)) for g in guidance_scales]
    return {
        "run": run.path,
        "checkpoint_step": run.step,
        "dataset": evaluator.dataset,
        "extractor": evaluator.extractor.name,
        "num_timesteps": run.schedule.num_timesteps,
        "steps": steps_rows,
        "guidance": guidance_rows,
        "floor": evaluator.floor() if floor else None,
    }


__all__ = [
    "METRICS",
    "Evaluator",
    "RunEvaluator",
    "check_sampling",
    "parse_steps_spec",
    "sweep",
]
