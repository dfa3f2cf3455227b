"""The preparation of a training run, before anything is built: :func:`prepare`.

One step, the same for every kind of run (pixel, latent with its autoencoder phase): validate the
config against the job's devices, check the work directory, hold the trainer lock
(``workdir.trainer_lock``), compare the config with a saved one (``resume.check_resume``), refuse
to start from step 0 over the records of checkpoints that are gone (:func:`check_not_lost`) and
read the config history, all before anything is compiled or written. What it found is a
:class:`RunStart`, passed to the run loop (``ddpm_jax.train.train``) rather than rediscovered;
once the loop has restored a checkpoint, :func:`record_start` writes what the start changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections

from ddpm_jax import config as config_lib, resume
from ddpm_jax.errors import UsageError
from ddpm_jax.workdir import (
    JsonLines,
    check_workdir,
    is_writer,
    log,
    read_json,
    trainer_lock,
    warn,
    write_json,
)


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What :func:`prepare` found about a run's work directory.

    Attributes:
      workdir: the absolute work directory.
      changes: ``resume.check_resume``'s changes of the config (``{field: (old, new)}``).
      history: ``resume.read_history`` of the workdir, read before anything was written.
      start_over: when the run has checkpoints and none can be restored, move them aside and
        train from step 0 (without it, that is an error and nothing is changed).
      lost: the run starts over records whose checkpoints are gone (:func:`check_not_lost`).
    """

    workdir: str
    changes: dict[str, tuple[Any, Any]]
    history: list[dict]
    start_over: bool = False
    lost: bool = False


@contextlib.contextmanager
def prepare(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
) -> Iterator[RunStart]:
    """Prepares a run of ``config`` in ``workdir`` and holds its trainer lock while in the block.

    Nothing is written here: ``config.json`` is written once a checkpoint has been restored
    (:func:`record_start`), or by a phase that writes before the run loop (a latent run's
    autoencoder) with :func:`write_config`, so that a re-run of that phase is compared.

    Args:
      config: a ConfigDict built from ``ddpm_jax.config.default_config()``.
      workdir: the work directory (created).
      start_over: see :class:`RunStart`.
      allow_change: the fields that change what is trained (``resume.TRAINING``) that this
        resume may change (``--allow_change``).

    Raises:
      UsageError: an invalid config, workdir or resume; nothing was written.
    """
    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    workdir = check_workdir(workdir)
    with trainer_lock(workdir):
        changes = resume.check_resume(config, workdir, allow_change)
        lost = check_not_lost(workdir, config.train, start_over)
        history = resume.read_history(workdir)  # every process, before process 0 appends to it
        yield RunStart(workdir, changes, history, start_over=start_over, lost=lost)


# A run's records, moved aside (never deleted) when it starts over from step 0.
_RECORDS = ("metrics.jsonl", "config_history.jsonl", "samples.npz", "report.png", "samples")


def record_start(
    workdir: str,
    config: ml_collections.ConfigDict,
    start: int,
    changes: dict,
    position: resume.DataPosition,
    num_examples: int,
    *,
    started_over: bool,
) -> None:
    """config.json, config_history.jsonl and the records of a run whose checkpoint of step
    ``start`` was restored (or that starts at 0), from process 0.

    A start over moves the earlier records aside. ``config_history.jsonl`` gets one record
    ``{"step", "time"}`` with the config's ``"changes"`` (``{field: [old, new]}``; ``"allowed"``:
    those let through by ``--allow_change``) and, when ``position.record``, the data position
    (``"examples_seen"`` and the ``"batch_size"`` from this step on; ``num_examples`` of the
    dataset gives the epoch), before ``config.json`` is replaced.
    """
    if started_over:  # a start over keeps the old records beside the new ones
        stamp = int(time.time())
        for name in _RECORDS:
            if os.path.exists(os.path.join(workdir, name)):
                kept = os.path.join(workdir, f"{name}.{stamp}.before-step-0")
                os.replace(os.path.join(workdir, name), kept)
                warn(f"training starts from step 0: the earlier {name} was moved to {kept}")
    record = dict(step=start, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if changes and start > 0:
        record["changes"] = {f: [a, b] for f, (a, b) in changes.items()}
        allowed = [f for f in changes if f in resume.TRAINING]
        if allowed:
            record["allowed"] = allowed
        listed = ", ".join(
            f"{f} {a!r} -> {b!r}" + (" (--allow_change)" if f in allowed else "")
            for f, (a, b) in changes.items()
        )
        log(f"config changes from step {start} on ({resume.HISTORY_FILE}): {listed}")
    if position.record:
        batch, seen = config.train.batch_size, position.examples_seen
        record.update(examples_seen=seen, batch_size=batch)
        log(
            f"data: batches of {batch} from step {start} on continue the shuffled stream "
            f"after the {seen} examples seen (epoch {seen // num_examples + 1})"
        )
    if len(record) > 2:
        JsonLines(os.path.join(workdir, resume.HISTORY_FILE)).append(record)
    write_config(workdir, config)


def write_config(workdir: str, config: ml_collections.ConfigDict, *, replace: bool = True) -> None:
    """``workdir/config.json``: the config used (process 0); ``replace=False`` keeps one that
    is there."""
    path = os.path.join(workdir, "config.json")
    if is_writer() and (replace or read_json(path) is None):
        write_json(path, json.loads(config.to_json()))


def check_not_lost(workdir: str, train_config: Any, start_over: bool) -> bool:
    """Refuses to start a run from step 0 over records of checkpoints that are gone (before
    anything in ``workdir`` is created); returns whether the run starts over such records
    (``start_over``: they are then moved aside by the run loop).

    Raises:
      UsageError: ``workdir`` has no checkpoint but :func:`records_of_checkpoints`.
    """
    directory = os.path.join(workdir, "checkpoints")
    if os.path.isdir(directory) and any(p.isdigit() for p in os.listdir(directory)):
        return False  # restore_latest decides
    lost = records_of_checkpoints(
        workdir, train_config.checkpoint_every, train_config.steps_per_call
    )
    if lost and not start_over:
        raise UsageError(
            f"{workdir} holds the records of a run ({lost}) but no checkpoint in {directory}; "
            "nothing was changed. Put its checkpoints back, or pass --start_over to keep the old "
            "records beside and train from step 0"
        )
    return bool(lost)


def records_of_checkpoints(workdir: str, checkpoint_every: int, steps_per_call: int = 1) -> str:
    """What in ``workdir`` shows that its run had completed a checkpoint: final samples, a
    resume recorded in ``config_history.jsonl``, or metrics of a step past the second checkpoint
    (a save waits for the one before it, and the records of later steps are written after the
    second save started, so the first was complete on disk; the first alone may have been cut
    short by a kill inside its asynchronous write). ``checkpoint_every`` and ``steps_per_call``
    are the larger of now and the saved ``config.json``'s. '' when nothing shows it (a new run,
    or one stopped before a checkpoint was complete, whose records are recomputed bit for
    bit)."""
    found = [n for n in ("samples.npz", "config_history.jsonl") if os.path.exists(f"{workdir}/{n}")]
    logged = [r["step"] for r in JsonLines(os.path.join(workdir, "metrics.jsonl")).read()]
    saved = read_json(os.path.join(workdir, "config.json")) or {}
    every = max(checkpoint_every, _get(saved, "train.checkpoint_every", 0))
    per_call = max(steps_per_call, _get(saved, "train.steps_per_call", 1))
    if logged and max(logged) >= 2 * every + per_call:
        found.append(f"metrics.jsonl up to step {max(logged)}")
    return ", ".join(found)


def _get(tree: dict, field: str, default: Any) -> Any:
    """``tree["a"]["b"]`` for ``field="a.b"`` of a config as JSON; ``default`` when absent."""
    for part in field.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


__all__ = [
    "RunStart",
    "check_not_lost",
    "prepare",
    "record_start",
    "records_of_checkpoints",
    "write_config",
]
