"""Resuming a run with an edited config: which changes a resumed run may take.

A diffusion run on a pod is resumed many times, usually after someone edited a flag. Every field
of ``default_config()`` and of the ``latent`` and ``finetune`` sections is classified here, in
exactly one of three tables (a test walks every field):

- :data:`IDENTITY`: fields that fix what the run is (the training state's structure, the dataset
  and image size, the diffusion process, the seed, the frozen autoencoder and text encoder). A
  resumed run refuses to change them, whatever the flags; ``train.grad_clip`` switched between 0
  and > 0 (the optimizer state's structure) is refused too.
- :data:`TRAINING`: fields that change what is trained from the resumed step on (the data stream,
  the augmentation, the loss weighting, label and network dropout). Refused unless the user names
  them in ``--allow_change=FIELD[,FIELD...]``; a change let through is recorded with the flag.
- :data:`FREE`: everything else (more steps, intervals, sampling and evaluation settings, the
  optimizer's step sizes, the device count or parallel layout: a checkpoint restores into any of
  them); changed freely.

Every change a resumed run takes is printed and appended to ``config_history.jsonl``.
:func:`check_resume` refuses before anything in the work directory is touched.

A changed ``train.batch_size`` continues the data stream where it stopped: the run's data
position (examples consumed) is kept in ``config_history.jsonl`` from the first batch-size change
on (:func:`data_position`), and the batches after the resumed step continue the same shuffled
stream from it, so no example of the epoch is skipped or repeated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections

from ddpm_jax.errors import UsageError
from ddpm_jax.formulation import DEFAULTS as FORMULATION_DEFAULTS
from ddpm_jax.workdir import JsonLines, read_json

HISTORY_FILE = "config_history.jsonl"

# Refused on resume, whatever the flags: the run would no longer be the run its checkpoints and
# records belong to.
IDENTITY = tuple(
    # the randomness of init, data order, timesteps and noise
    "seed "
    # the dataset and the shape of its examples (a checkpoint of another shape cannot restore)
    "data.name data.image_size data.channels "
    # a folder's captions: whether the run is text-conditioned on them
    "data.captions "
    # the network's structure (its parameters' shapes and what they condition on)
    "model.ch model.ch_mult model.num_res_blocks model.attn_resolutions model.num_heads "
    "model.num_groups model.resblock_conditioning model.class_conditional "
    # the diffusion process and the prediction target: what the network's output means
    "diffusion.schedule diffusion.num_timesteps diffusion.beta_start diffusion.beta_end "
    "diffusion.prediction "
    # the formulation (DDPM, EDM or flow) and EDM's σ_d: what the network's input and output are
    "diffusion.formulation diffusion.sigma_data "
    # latent runs: the frozen autoencoder (trained once, it defines the latent space) and the
    # prompts' text encoder, both part of what the network learned to read
    "latent.image_size latent.vae_block_out_channels latent.vae_layers_per_block "
    "latent.vae_norm_num_groups latent.vae_latent_channels latent.vae_steps "
    "latent.vae_batch_size latent.vae_lr latent.vae_kl_weight latent.text_width "
    "latent.text_depth latent.text_num_heads latent.text_max_length".split()
)

# Change what is trained from the resumed step on: refused unless ``--allow_change`` names them.
TRAINING = tuple(
    # the data stream: a resumed run continues it from the examples already seen (no example of
    # the epoch skipped or repeated), but the gradient noise and the steps per epoch change
    "train.batch_size "
    # the examples per epoch (in cifar_latent also the latents' scale factor)
    "data.num_examples "
    # the augmentation: the distribution the model is fit to
    "data.random_flip data.crop "
    # the loss: which timesteps the model is fit to, and how much
    "diffusion.weighting diffusion.min_snr_gamma "
    # EDM's training σ and flow's training times (the shift also moves flow's sampling grid)
    "diffusion.p_mean diffusion.p_std diffusion.t_distribution diffusion.shift "
    # label dropout: how much unconditional (guidance) training the model gets
    "train.p_uncond "
    # network dropout: the regularisation of every later step
    "model.dropout".split()
)

# Changed freely (printed and recorded): how far and how fast the run goes, what it writes, where
# it runs. The optimizer's step sizes are here: lowering ``train.lr`` (or raising the warmup or
# the clipping) after a plateau or a divergence is the usual deliberate edit of a resumed run.
FREE = tuple(
    # how long, how often, how many checkpoints are kept
    "train.num_steps train.log_every train.checkpoint_every train.keep_checkpoints "
    "train.sample_every "
    # the optimizer's values (the state's structure is unchanged; ``train.grad_clip`` switched
    # between 0 and > 0 is refused as an identity change, see resume_changes)
    "train.lr train.warmup_steps train.grad_clip train.b1 train.b2 train.eps train.ema_decay "
    # how the same steps are computed: steps per compiled call, the parallel layout and device
    # count (a checkpoint restores into any), the compute dtype (parameters stay float32), the
    # kernels (same results)
    "train.steps_per_call parallel mesh.fsdp mesh.fsdp_min_size model.dtype model.kernels "
    # where the same dataset is read from (a folder dataset: where it is, where it is prepared,
    # and what preparing it accepts; a folder whose files changed is prepared again)
    "data.data_dir data.manual_dir data.dir data.cache_dir data.upscale data.skip_unreadable "
    # the samples and evaluations the run writes
    "sample.num_samples sample.method sample.num_steps sample.guidance_scale sample.eta "
    "sample.clip_x0 sample.variance sample.grid_size sample.batch_size "
    # EDM's sampling grid
    "diffusion.sigma_min diffusion.sigma_max diffusion.rho "
    "eval.every eval.num_samples eval.method eval.num_steps eval.guidance_scale "
    "eval.inception_path eval.cache_dir latent.samples_per_prompt "
    # Stable Diffusion fine-tuning: where the pretrained folder is (its fingerprint, recorded in
    # the run, must not change: ``ddpm_jax.latent.finetune_sd``) and the prompts of the grids
    "finetune.pretrained finetune.grid_prompts".split()
)

_TRAINING, _FREE = frozenset(TRAINING), frozenset(FREE)
# What a saved config from before a field existed meant by its absence (a DDPM run).
_IMPLIED = {f"diffusion.{k}": v for k, v in FORMULATION_DEFAULTS.items()}


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
      ``(conflicts, changes)``: ``{field: (saved, given)}`` of the changed :data:`IDENTITY`
      fields (and of ``train.grad_clip`` switched between 0 and > 0, which changes the optimizer
      state's structure, and of any field of no table, e.g. of an experiment's own section), and
      of every other changed field (:data:`TRAINING` and :data:`FREE`).
    """
    old, new = _flatten(saved), _flatten(given)
    conflicts, changes = {}, {}
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field, _IMPLIED.get(field)), new.get(field)
        if a == b:
            continue
        identity = field not in _TRAINING and field not in _FREE
        if field == "train.grad_clip":  # clipping on or off changes the optimizer state
            identity = ((a or 0) > 0) != ((b or 0) > 0)
        (conflicts if identity else changes)[field] = (a, b)
    return conflicts, changes


def check_allow_change(allow_change: Sequence[str]) -> tuple[str, ...]:
    """The fields of ``--allow_change``, each a :data:`TRAINING` field.

    Raises:
      UsageError: a field that is not a :data:`TRAINING` field; the message says why.
    """
    fields = tuple(f.strip() for f in allow_change if f.strip())
    problems = []
    for f in fields:
        if f in _TRAINING:
            continue
        if f in _FREE:
            problems.append(f"{f} may change on resume without it")
        elif f in IDENTITY:
            problems.append(
                f"{f} fixes what the run is and never changes on resume (start a "
                "new run in a new --workdir)"
            )
        else:
            problems.append(f"{f} is not a field it takes")
    if problems:
        raise UsageError(
            f"--allow_change={','.join(fields)}: {'; '.join(problems)}. It takes the fields that "
            f"change what a resumed run trains: {', '.join(TRAINING)}"
        )
    return fields


def check_resume(
    config: ml_collections.ConfigDict, workdir: str, allow_change: Sequence[str] = ()
) -> dict[str, tuple]:
    """Compares ``config`` with the one the run in ``workdir`` was started with; reads only.

    Args:
      config: the config given now.
      workdir: the run's directory.
      allow_change: the :data:`TRAINING` fields the user lets change (``--allow_change``).

    Returns:
      ``{field: (saved, given)}`` of the changes the resumed run takes (:data:`FREE` fields and
      the allowed :data:`TRAINING` fields; empty for a new run).

    Raises:
      UsageError: an :data:`IDENTITY` field differs, or a :data:`TRAINING` field that
        ``allow_change`` does not name (each named with both values), or ``allow_change`` names
        another field. Nothing in ``workdir`` has been touched.
    """
    allowed = check_allow_change(allow_change)
    path = os.path.join(workdir, "config.json")
    saved = read_json(path)
    if saved is None:
        if os.path.exists(path):
            raise UsageError(f"{path} is not valid JSON: the run's config cannot be compared")
        return {}
    conflicts, changes = resume_changes(saved, json.loads(config.to_json()))
    listed = lambda fields: "; ".join(f"{f} was {a!r}, now {b!r}" for f, (a, b) in fields.items())
    if conflicts:
        raise UsageError(
            f"{workdir} holds a run of another configuration ({listed(conflicts)}); nothing was "
            "changed. Resume it with the values it was started with, or start a new run in a new "
            "--workdir"
        )
    refused = {f: v for f, v in changes.items() if f in _TRAINING and f not in allowed}
    if refused:
        raise UsageError(
            f"{workdir}: {listed(refused)} would change what the run trains from the resumed "
            f"step on; nothing was changed. Pass --allow_change={','.join(refused)} to change it "
            f"deliberately (recorded in {HISTORY_FILE}), or resume with the values the run was "
            "started with"
        )
    return changes


# ----------------------------------------------------------------------------- data position


class DataPosition(NamedTuple):
    """Where the data stream of a resumed run continues.

    Attributes:
      examples_seen: flat position in the shuffled stream of the first example of the resumed
        step's batch (the examples consumed before it).
      record: whether ``config_history.jsonl`` must record this position (with the batch size
        from this step on): the batch size changes here, or a record at a later step, written
        by a run whose steps are now trained again, must be superseded.
    """

    examples_seen: int
    record: bool


def read_history(workdir: str) -> list[dict]:
    """The records of ``config_history.jsonl`` in file order (empty when there is none)."""
    return JsonLines(os.path.join(workdir, HISTORY_FILE)).read()


def _position_records(history: Sequence[dict]) -> list[dict]:
    """The records that still hold: in file order, each supersedes every earlier one at its step
    or later (those steps were trained again). Sorted by step, strictly increasing."""
    valid: list[dict] = []
    for r in history:
        if isinstance(r.get("examples_seen"), int) and isinstance(r.get("batch_size"), int):
            valid = [v for v in valid if v["step"] < r["step"]]
            valid.append(r)
    return valid


def data_position(
    history: Sequence[dict], step: int, saved_batch_size: int, batch_size: int
) -> DataPosition:
    """The data position of a run resumed at ``step`` (a pure function of its history).

    Until its batch size first changes, a run's batch of step ``s`` starts at ``s * B``. From
    then on every start whose position cannot be read that way records
    ``{"step", "examples_seen", "batch_size"}`` in ``config_history.jsonl``; the position at
    ``step`` is that of the last record at or before it plus ``batch_size * (step - its step)``.
    Before the first record the batch size was constant: its ``examples_seen / step``.

    Args:
      history: :func:`read_history` of the run, read before anything was written.
      step: the restored step (0 for a new run or a start over).
      saved_batch_size: ``train.batch_size`` of the saved ``config.json``.
      batch_size: ``train.batch_size`` from ``step`` on.

    Returns:
      A :class:`DataPosition`.
    """
    valid = _position_records(history)
    before = [r for r in valid if r["step"] <= step]
    if before:
        last = before[-1]
        current = last["batch_size"]
        seen = last["examples_seen"] + current * (step - last["step"])
    else:
        current = valid[0]["examples_seen"] // valid[0]["step"] if valid else saved_batch_size
        seen = current * step
    later = any(r["step"] > step for r in valid)
    return DataPosition(seen, later or (step > 0 and current != batch_size))


__all__ = [
    "FREE",
    "HISTORY_FILE",
    "IDENTITY",
    "TRAINING",
    "DataPosition",
    "check_allow_change",
    "check_resume",
    "data_position",
    "read_history",
    "resume_changes",
]
