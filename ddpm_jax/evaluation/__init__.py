"""Evaluation of sample quality: metrics, reference statistics, scoring runs and reports.

- :mod:`ddpm_jax.evaluation.metrics`: FID, KID and Inception Score on features (float64 NumPy,
  streaming statistics).
- :mod:`ddpm_jax.evaluation.digits_classifier`: a small CNN for the 8x8 digits, whose features
  and predictions give digits-FID / KID and the class accuracy of conditional samples.
- :mod:`ddpm_jax.evaluation.reference`: feature extractors (digits classifier, FID Inception),
  the real images of a dataset split, and their cached reference statistics.
- :mod:`ddpm_jax.evaluation.evaluate`: ``Evaluator`` (scores images against a dataset's
  reference statistics, no run needed).
- :mod:`ddpm_jax.evaluation.during_training`: the training loop's periodic FID / KID.
- :mod:`ddpm_jax.evaluation.sweep`: ``RunEvaluator`` (samples a loaded run and scores it) and
  ``sweep`` (metrics against the number of steps and the guidance scale); it loads runs
  (``ddpm_jax.runs``), so only ``experiments.evaluate`` imports it.
- :mod:`ddpm_jax.evaluation.report`: JSON reports, Markdown tables and matplotlib charts.

The FID Inception network is :mod:`ddpm_jax.models.inception`, its weights
:mod:`ddpm_jax.weights.fid_inception`.
"""
