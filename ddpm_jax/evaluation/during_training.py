"""Evaluation during training: FID / KID (and class accuracy) of EMA samples every N steps.

The DDPM paper's own figure is FID against training steps; every diffusion codebase that trains for
days tracks it. With ``config.eval.every = N`` the run loop calls :class:`PeriodicEvaluation`
every N steps (and at the last step): ``eval.num_samples`` samples from the EMA parameters with
``eval.method`` / ``eval.num_steps`` / ``eval.guidance_scale``, sharded over every device, always
from the same noise (``fold_in(run_key(seed, EVAL_TAG), 0)``, the key of
``experiments.evaluate``), scored against the training split's reference statistics, computed
once and cached (``evaluation.evaluate.Evaluator``). Digits runs get the digits-FID / KID of the
digits classifier's features and the class accuracy of class-conditional samples; other datasets
the FID Inception's FID / KID / Inception Score (``eval.inception_path`` for offline machines).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import ml_collections

from ddpm_jax import builders, folder_source
from ddpm_jax.evaluation.evaluate import Evaluator
from ddpm_jax.generate import Generator
from ddpm_jax.workdir import EVAL_TAG, run_key

# Evaluator.score keys recorded, and their names in metrics.jsonl / TensorBoard ("eval/...").
_RECORDED = ("fid", "kid_mean", "accuracy", "inception_score")


class PeriodicEvaluation:
    """Scores EMA samples of a run (``config.eval``); one call per evaluation step.

    Args:
      config: the run's config (``eval``, ``data``, ``sample.batch_size``, ``seed``).
      generator: the run's :class:`~ddpm_jax.generate.Generator` (its compiled sampler is reused
        when ``eval.method`` / ``eval.num_steps`` equal ``sample.*``).
      output_shape: ``(H, W, C)`` of the generated images.
      labels_are_classes: whether conditioning labels are the dataset's classes (class
        accuracy); False for unconditional models and prompt-conditioned latent runs.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        generator: Generator,
        output_shape: Sequence[int],
        labels_are_classes: bool,
    ):
        e, d = config.eval, config.data
        self.num_samples, self.guidance_scale = e.num_samples, e.guidance_scale
        same = (generator.method, generator.num_steps) == (e.method, e.num_steps)
        self.generator = generator if same else _with(generator, e.method, e.num_steps)
        self.labels_are_classes = labels_are_classes
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
        out = self.generator(
            ema_params,
            self.key,
            self.num_samples,
            guidance_scale=self.guidance_scale,
            should_stop=should_stop,
        )
        if out is None:
            return None
        imgs, labels = out
        classes = labels if self.labels_are_classes else None
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


def _with(generator: Generator, method: str, num_steps: int) -> Generator:
    """A generator like ``generator`` with another sampler."""
    return Generator(
        generator.model,
        generator.schedule,
        generator.dp,
        generator.image_shape,
        method=method,
        num_steps=num_steps,
        guidance_scale=generator.guidance_scale,
        eta=generator.eta,
        clip_x0=generator.clip_x0,
        prediction=generator.prediction,
        variance=generator.variance,
        batch_size=generator.batch_size,
        decode_fn=generator.decode_fn,
    )


__all__ = ["PeriodicEvaluation", "summary"]
