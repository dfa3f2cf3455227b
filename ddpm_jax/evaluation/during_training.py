"""Evaluation during training: FID / KID (and class accuracy) of EMA samples every N steps.

The DDPM paper's own figure is FID against training steps; every diffusion codebase that trains for
days tracks it. With ``config.eval.every = N`` the run loop calls :class:`PeriodicEvaluation`
every N steps (and at the last step): ``eval.num_samples`` samples from the EMA parameters with
``eval.method`` / ``eval.num_steps`` / ``eval.guidance_scale`` (the rest of ``config.sample``),
sharded over every device, always from the same noise (``fold_in(run_key(seed, EVAL_TAG), 0)``,
the key of ``experiments.evaluate``), scored against the training split's reference statistics,
computed once and cached (``evaluation.evaluate.Evaluator``). Digits runs get the digits-FID /
KID of the digits classifier's features and the class accuracy of conditional samples; other
datasets the FID Inception's FID / KID / Inception Score (``eval.inception_path`` offline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from ddpm_jax import builders, folder_source
from ddpm_jax.evaluation.evaluate import Evaluator
from ddpm_jax.generate import Generator
from ddpm_jax.workdir import EVAL_TAG, run_key

# Evaluator.score keys recorded, and their names in metrics.jsonl / TensorBoard ("eval/...").
_RECORDED = ("fid", "kid_mean", "accuracy", "inception_score")


class PeriodicEvaluation:
    """Scores EMA samples of a run (``config.eval``); one call per evaluation step.

    Args:
      config: the run's config (``eval``, ``data``, ``seed``).
      generator: the run's :class:`~ddpm_jax.generate.Generator`; evaluation samples with its
        settings where ``eval`` sets none (``builders.sample_settings(config, "eval")``), and
        reuses its compiled sampler when they are the same.
      output_shape: ``(H, W, C)`` of the generated images.
      label_classes: ``[num_labels]`` int32, the dataset class each conditioning label stands
        for (a latent run's prompts), or None when the labels are the dataset's classes (class
        accuracy is scored when every sample has a class).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        generator: Generator,
        output_shape: Sequence[int],
        label_classes: np.ndarray | None = None,
    ):
        e, d = config.eval, config.data
        self.num_samples = e.num_samples
        self.generator = generator.with_settings(builders.sample_settings(config, "eval"))
        self.label_classes = label_classes
        self.key = jax.random.fold_in(run_key(config.seed, EVAL_TAG), 0)
        # Built now, before the training step compiles: a missing Inception file or dataset is
        # found at the start, not after eval.every steps (the statistics are cached on disk).
        folder = d.name == folder_source.FOLDER  # its statistics: of the prepared images
        self.evaluator = Evaluator(
            d.name,
            output_shape,
            data_dir=builders.prepare_folder(config).path if folder else d.data_dir,
            manual_dir=d.manual_dir,
            inception_path=e.inception_path,
            cache_dir=e.cache_dir,
            kid_subset_size=min(1000, e.num_samples),
        )

    def __call__(
        self, ema_params, step: int, should_stop: Callable[[], bool] | None = None
    ) -> dict | None:
        """The record of ``step``: ``{"step", "eval/<metric>": ..., "eval/seconds"}``, with
        ``digits_fid`` / ``digits_kid_mean`` for the digits classifier's features; None when
        ``should_stop()`` (asked after each sampling round, e.g. a preemption notice) said so."""
        t0 = time.time()
        out = self.generator(ema_params, self.key, self.num_samples, should_stop=should_stop)
        if out is None:
            return None
        imgs, classes = out
        if self.label_classes is not None:  # -1 (no label) stays -1
            classes = np.where(classes >= 0, self.label_classes[np.maximum(classes, 0)], -1)
        scores = self.evaluator.score(imgs, classes)
        prefix = "eval/digits_" if self.evaluator.extractor.classes else "eval/"
        record = {"step": step}
        for name in _RECORDED:
            if name in scores:
                record[("eval/" if name == "accuracy" else prefix) + name] = scores[name]
        record["eval/seconds"] = time.time() - t0
        return record


def summary(record: dict) -> str:
    """``digits_fid 12.3 | accuracy 0.95 (2.1 s)`` for a progress line."""
    parts = [
        f"{k.removeprefix('eval/')} {v:.4g}"
        for k, v in record.items()
        if k.startswith("eval/") and k != "eval/seconds" and not k.endswith("kid_mean")
    ]
    return " | ".join(parts) + f" ({record['eval/seconds']:.1f} s)"


__all__ = ["PeriodicEvaluation", "summary"]
