"""Sampling a trained run and scoring it: one setting, or sweeps of steps and guidance.

:class:`RunEvaluator` samples a loaded run (:func:`ddpm_jax.runs.load_run`, pixel or latent, or
published weights) with given :class:`~ddpm_jax.sample_settings.SampleSettings` and scores the
samples with an :class:`~ddpm_jax.evaluation.evaluate.Evaluator` of the run's dataset at the run's
output size (a latent digits run's 16x16 samples against digits resized to 16x16; its prompts
mapped to their classes). :func:`sweep` runs the metrics against the number of steps for each
method and against the guidance scale (written by :func:`ddpm_jax.evaluation.report.write_sweep`).
Used by ``experiments.evaluate``; the training loop imports none of it.

Evaluation samples use the root key ``fold_in(fold_in(key(seed), EVAL_TAG), 0)``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ddpm_jax import samplers
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation.evaluate import Evaluator
from ddpm_jax.generate import Generator, ProgressLine
from ddpm_jax.runs import LoadedRun
from ddpm_jax.sample_settings import SampleSettings
from ddpm_jax.workdir import EVAL_TAG, log, run_key


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
        self._generators: dict[SampleSettings, Generator] = {}

    def sample(
        self, settings: SampleSettings, num_samples: int, *, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Samples with ``settings`` (each sampler's generator keeps its compiled programs; the
        guidance scale is traced, so scales share them).

        Raises:
          UsageError: invalid settings or ``num_samples`` < 2.

        Returns:
          ``(images uint8 [N, H, W, C], labels int32 [N], seconds)``; labels are the run's
          conditioning labels (see :meth:`ddpm_jax.runs.LoadedRun.classes_of`).
        """
        settings.check(self.run.schedule.num_timesteps)
        if not isinstance(num_samples, int) or num_samples < 2:
            raise UsageError(f"num_samples={num_samples!r} is invalid: expected an integer >= 2")
        sampler = settings.replace(guidance_scale=1.0)
        if sampler not in self._generators:
            self._generators[sampler] = self.run.generator(sampler)
        key = jax.random.fold_in(run_key(seed, EVAL_TAG), 0)
        s = settings
        label = f"{s.method} {s.num_steps} steps, guidance {s.guidance_scale:g}"
        progress = ProgressLine(label, num_samples, self.verbose)
        t0 = time.time()
        imgs, labels = self._generators[sampler](
            self.run.ema_params,
            key,
            num_samples,
            guidance_scale=s.guidance_scale,
            progress=progress,
        )
        return imgs, labels, time.time() - t0

    def evaluate(
        self, settings: SampleSettings, num_samples: int, *, seed: int = 0
    ) -> tuple[dict, np.ndarray]:
        """Samples and scores one setting.

        Returns:
          ``(report, images uint8 [N, H, W, C])``; the report holds the settings, ``metrics``
          (see :meth:`Evaluator.score`), ``timing`` (``sample_s``, ``images_per_s``,
          ``metrics_s``) and ``reference`` (``path``, ``count``, ``from_cache``).
        """
        imgs, labels, sample_s = self.sample(settings, num_samples, seed=seed)
        t0 = time.time()
        ev = self.evaluator
        scores = ev.score(imgs, self.run.classes_of(labels))
        report = {
            "run": self.run.path,
            "checkpoint_step": self.run.step,
            "dataset": ev.dataset,
            "extractor": ev.extractor.name,
            **dataclasses.asdict(settings),
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
    settings: SampleSettings,
    *,
    steps: dict[str, Sequence[int]],
    guidance_scales: Sequence[float],
    num_samples: int,
    num_samples_for: Callable[[str, int], int] | None = None,
    seed: int = 0,
    floor: bool = True,
) -> dict:
    """Metrics against the number of steps per method, and against the guidance scale.

    Args:
      run_evaluator: a :class:`RunEvaluator`.
      settings: the settings every cell starts from: the steps sweep replaces ``method`` and
        ``num_steps`` (at ``settings.guidance_scale``), the guidance sweep ``guidance_scale``.
      steps: ``{method: [num_steps, ...]}`` of the steps sweep.
      guidance_scales: scales of the guidance sweep.
      num_samples: samples per cell; ``num_samples_for(method, steps)`` may lower it per cell.
      seed: see :meth:`RunEvaluator.evaluate`.
      floor: also score the held-out test split.

    Returns:
      ``{"steps": [cell, ...], "guidance": [cell, ...], "floor": {...} | None, ...}``; each cell
      has ``method, num_steps, guidance_scale, num_samples, metrics, sample_s, images_per_s,
      metrics_s``.
    """
    run, evaluator = run_evaluator.run, run_evaluator.evaluator

    def cell(s: SampleSettings) -> dict:
        count = num_samples if num_samples_for is None else num_samples_for(s.method, s.num_steps)
        report, _ = run_evaluator.evaluate(s, count, seed=seed)
        row = {k: report[k] for k in ("method", "num_steps", "guidance_scale", "num_samples")}
        row.update(metrics=report["metrics"], **report["timing"])
        if run_evaluator.verbose:
            log(f"  -> {json.dumps(row['metrics'])}  ({row['sample_s']:.1f} s sampling)")
        return row

    steps_rows = [
        cell(settings.replace(method=m, num_steps=n)) for m, ns in steps.items() for n in ns
    ]
    guidance_rows = [cell(settings.replace(guidance_scale=float(g))) for g in guidance_scales]
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


__all__ = ["RunEvaluator", "parse_steps_spec", "sweep"]
