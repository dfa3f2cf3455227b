"""Resuming a run with an edited config: which changes a resumed run may take.

A diffusion run on a pod is resumed many times, usually after someone edited a flag. Fields that
fix what the run trains (:data:`RUN_IDENTITY`: the network, the optimizer's clipping stage, the
dataset and image size, the schedule and prediction target, the seed) cannot change: the re-run
stops with one line naming each such field with its saved and new value, before anything in the
work directory is touched (:func:`check_resume`). Every other field may change (more steps, other
intervals, sampling settings, learning-rate values, the device count or the parallel layout: a
checkpoint restores into any of them); the run records each change in ``config_history.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from ddpm_jax.errors import UsageError
from ddpm_jax.workdir import read_json

# Fields that fix what a run trains: the training state's structure (the network, the optimizer's
# clipping stage) or the meaning of its data (dataset, image size, schedule, prediction target,
# the seed's randomness). A resumed run refuses to change them; any other field may change between
# invocations of the same run (more steps, other intervals, sampling settings, learning-rate
# values, the device count or parallel layout) and each change is recorded.
RUN_IDENTITY = tuple(
    """seed data.name data.image_size model.ch model.ch_mult model.num_res_blocks
    model.attn_resolutions model.num_heads model.num_groups model.resblock_conditioning
    model.class_conditional diffusion.schedule diffusion.num_timesteps diffusion.beta_start
    diffusion.beta_end diffusion.prediction latent.""".split()
)  # "latent.": the whole section (the frozen autoencoder, the prompts' encoder) but:
_RESUME_FREE = ("latent.samples_per_prompt",)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, given: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Compares the config a run was started with (``config.json``) with the one given now.

    Args:
      saved / given: configs as JSON objects (``json.loads(config.to_json())``).

    Returns:
      ``(conflicts, changes)``: ``{field: (saved, given)}`` of the fields that fix what the run
      trains (:data:`RUN_IDENTITY`, and ``train.grad_clip`` switched between 0 and > 0, which
      changes the optimizer state's structure), and of every other changed field.
    """
    old, new = _flatten(saved), _flatten(given)
    conflicts, changes = {}, {}
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        identity = field not in _RESUME_FREE and any(
            field == f or (f.endswith(".") and field.startswith(f)) for f in RUN_IDENTITY
        )
        if field == "train.grad_clip":  # clipping on or off changes the optimizer state
            identity = ((a or 0) > 0) != ((b or 0) > 0)
        (conflicts if identity else changes)[field] = (a, b)
    return conflicts, changes


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple]:
    """Compares ``config`` with the one the run in ``workdir`` was started with; reads only.

    Returns:
      ``{field: (saved, given)}`` of the fields that may change between invocations of a run
      (empty for a new run).

    Raises:
      UsageError: a field that fixes what the run trains differs (:data:`RUN_IDENTITY`); the
        message names each with both values. Nothing in ``workdir`` has been touched.
    """
    path = os.path.join(workdir, "config.json")
    saved = read_json(path)
    if saved is None:
        if os.path.exists(path):
            raise UsageError(f"{path} is not valid JSON: the run's config cannot be compared")
        return {}
    conflicts, changes = resume_changes(saved, json.loads(config.to_json()))
    if conflicts:
        listed = "; ".join(f"{f} was {a!r}, now {b!r}" for f, (a, b) in conflicts.items())
        raise UsageError(
            f"{workdir} holds a run of another configuration ({listed}); nothing was changed. "
            "Resume it with the values it was started with, or start a new run in a new --workdir"
        )
    return changes


__all__ = ["RUN_IDENTITY", "check_resume", "resume_changes"]
