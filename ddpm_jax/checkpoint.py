"""Orbax checkpoints of the training state that never lose work.

:class:`Checkpointer` wraps an ``ocp.CheckpointManager``:

- saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the caller
  may donate the state's buffers right away; the write to disk continues in the background);
- the last ``max_to_keep`` checkpoints are kept;
- an interrupted save leaves only an Orbax temporary directory, which is ignored (and cleaned up
  by the training run, never by a reader);
- :meth:`Checkpointer.restore_latest` restores the newest checkpoint that every process can read,
  the processes agreeing on each candidate; newer ones whose files are damaged (truncated,
  missing, undecodable) are moved aside to ``<directory>.corrupt/`` (never deleted), a checkpoint
  of another structure is a user's mistake (not damage), a failure of the environment (permission
  denied, an I/O error, device memory) stops with nothing moved, and when none can be read
  nothing is changed unless the user asks to start over;
- ``read_only=True`` opens a run's checkpoints for reading only (sampling, evaluation), even while
  the run trains: nothing is created, cleaned up, moved or deleted, and an Orbax temporary
  directory (a save in progress) is left alone and ignored.

:func:`ddpm_jax.failures.read_failure` tells, from an exception chain, damaged files from a
failure of the environment.

Every process must call every method (Orbax and the restore agreement synchronise them); only
process 0 writes the shared metadata and moves damaged checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax.errors import CheckpointFault, UsageError
from ddpm_jax.failures import DAMAGED, DENIED, FAULT, read_failure

PyTree = Any


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
    return "is read only" not in record.getMessage()


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Asynchronous Orbax checkpoints of a pytree in ``directory``, one per saved step.

    Args:
      directory: checkpoint directory (created unless ``read_only``); steps are sub-directories
        named by number.
      max_to_keep: number of most recent checkpoints kept (ignored when ``read_only``).
      async_save: write in a background thread (``save`` returns after the host copy).
      replica_parallel: let the replicas of a replicated array each write a slice of it
        (Orbax's replica-parallel saving). None: off on CPU, where all replicas share one host
        memory and the slicing only costs a compilation per array shape; Orbax's default
        elsewhere.
      read_only: only read (a run's readers, possibly while it trains): the directory is not
        created, temporary directories of saves in progress are neither cleaned up nor read,
        :meth:`save` raises and :meth:`restore_latest` moves nothing.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        replica_parallel: bool | None = None,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.corrupt_directory = self.directory + ".corrupt"
        self.read_only = read_only
        if read_only:  # every option that could write, in the values Orbax's read_only wants
            self._options = ocp.CheckpointManagerOptions(
                read_only=True,
                max_to_keep=None,
                create=False,
                cleanup_tmp_directories=False,
                save_interval_steps=0,
                enable_async_checkpointing=False,
                lightweight_initialize=True,  # no metadata reads of steps the run may delete
            )
        else:
            if max_to_keep is None:
                raise ValueError("max_to_keep is required unless read_only")
            self._options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            )
        if replica_parallel is None and jax.default_backend() == "cpu":
            replica_parallel = False
        self._replica_parallel = replica_parallel
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        th = ocp.type_handlers
        registry = th.create_type_handler_registry(
            (int, th.ScalarHandler()),
            (float, th.ScalarHandler()),
            (np.number, th.ScalarHandler()),
            (np.ndarray, th.NumpyHandler()),
            (str, th.StringHandler()),
            (jax.Array, th.ArrayHandler(use_replica_parallel=self._replica_parallel)),
        )
        self._handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
        # Orbax warns on every read-only open (it is what a reader asked for, not news).
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_drop_read_only_notice)
        try:
            return ocp.CheckpointManager(
                self.directory, options=self._options, item_handlers=self._handler
            )
        finally:
            absl_logger.removeFilter(_drop_read_only_notice)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree) -> bool:
        """Starts saving ``state`` as checkpoint ``step`` (waits for the previous save first).

        Returns:
          False when a checkpoint of ``step`` already exists (nothing is written), else True.

        Raises:
          RuntimeError: the checkpointer is read-only.
        """
        self._check_writable("save")
        if step in self._manager.all_steps():
            return False
        return bool(self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True))

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, abstract_state: PyTree) -> PyTree:
        """Restores checkpoint ``step`` into the structure, shapes and shardings of
        ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set).

        Raises:
          UsageError: the checkpoint holds a state of another structure (see
            :meth:`restore_latest`).
          Exception: whatever reading a damaged checkpoint raises.
        """
        mismatch = self._structure_mismatch(step, abstract_state)
        if mismatch:
            raise UsageError(self._mismatch_message(step, mismatch))
        return self._read(step, abstract_state)

    def _read(self, step: int, abstract_state: PyTree) -> PyTree:
        # The handler, not the manager: the manager's restore ends at a barrier of all
        # processes, which a process whose read failed would never reach (a hang).
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
        return self._handler.restore(self._item_path(step), args=args)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise RuntimeError(f"cannot {what}: the checkpoints in {self.directory} are read-only")

    def _item_path(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step) / "default"

    def _structure_mismatch(self, step: int, abstract_state: PyTree) -> str:
        """'' when checkpoint ``step`` holds arrays of the paths, shapes and dtypes of
        ``abstract_state``; else the first differences. Raises when the metadata is unreadable."""
        saved = _shapes(self._handler.metadata(self._item_path(step)).tree)
        wanted = _shapes(abstract_state)
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
        parts = [f"{k}: saved {saved[k][0]}, built {wanted[k][0]}" for k in changed[:3]]
        parts += [f"{k} not in the checkpoint" for k in missing[:3]]
        parts += [f"{k} only in the checkpoint" for k in extra[:3]]
        return "; ".join(parts)

    def _mismatch_message(self, step: int, mismatch: str) -> str:
        return (
            f"checkpoint {step} in {self.directory} holds a training state of another structure "
            f"than this config builds ({mismatch}); nothing was changed. Resume it with the "
            "config it was trained with (its config.json), or use a new --workdir"
        )

    def restore_latest(
        self, abstract_state: PyTree, *, start_over: bool = False
    ) -> tuple[PyTree | None, int | None]:
        """Restores the newest checkpoint that every process can read.

        The checkpoints are tried newest first. Every process reads each candidate itself and the
        processes agree on the outcome before going on, so all of them restore the same step, or
        all of them raise the same error: never a hang. The outcomes:

        - it restores: checkpoints newer than it that could not be read are moved to
          ``<directory>.corrupt/<step>-<unix time>`` (never deleted), each named in one warning,
          so that training can save those steps again;
        - it holds a state of another structure (changed model, optimizer, image shape): that is
          not damage; :class:`~ddpm_jax.errors.UsageError`, nothing is changed;
        - reading it fails without evidence that its files are damaged (see
          :func:`~ddpm_jax.failures.read_failure`): nothing is changed, no older one is tried.
          Permission denied: :class:`~ddpm_jax.errors.UsageError`; anything else (an I/O error,
          device out of memory, an unknown error): :class:`~ddpm_jax.errors.CheckpointFault`;
        - none restores: :class:`~ddpm_jax.errors.UsageError` naming them, nothing is changed;
          with ``start_over`` they are moved aside and ``(None, None)`` is returned.

        Read-only, damaged checkpoints are skipped with a warning and left in place, and a
        checkpoint that disappears while it is read (deleted by the training run) is skipped.

        Args:
          abstract_state: see :meth:`restore`.
          start_over: the user's explicit choice to start from step 0 when no checkpoint can be
            restored (not when read-only).

        Returns:
          ``(state, step)``, or ``(None, None)`` when there is no checkpoint (or none restores
          and ``start_over``).
        """
        if start_over and self.read_only:
            raise ValueError("start_over needs a writable Checkpointer")
        failed: list[tuple[int, str]] = []
        for step in reversed(self._agreed_steps()):
            outcome, detail, state = _OK, "", None
            try:
                detail = self._structure_mismatch(step, abstract_state)
                if detail:
                    outcome = _MISMATCH
                else:
                    state = self._read(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - classified: only damage moves files.
                outcome, detail = _OUTCOME[read_failure(e)], _first_line(e)
                if self.read_only and not os.path.isdir(os.path.join(self.directory, str(step))):
                    outcome, detail = _VANISHED, ""  # deleted by the run (max_to_keep)
            outcome = _worst_over_processes(outcome)
            elsewhere = "on another process"
            if outcome == _MISMATCH:
                raise UsageError(self._mismatch_message(step, detail or elsewhere))
            if outcome == _DENIED:
                raise UsageError(
                    f"cannot read checkpoint {step} in {self.directory}: permission denied "
                    f"({detail or elsewhere}); nothing was moved. Fix the permissions, then run "
                    "the same command again"
                )
            if outcome == _FAULT:
                raise CheckpointFault(
                    f"cannot read checkpoint {step} in {self.directory}: {detail or elsewhere}; "
                    "this is not damage to its files, nothing was moved. Fix the cause, then "
                    "run the same command again"
                )
            if outcome == _OK:
                if failed and self.read_only:
                    for s, d in failed:
                        _warn(
                            f"checkpoint {s} in {self.directory} cannot be restored ({d}); "
                            f"left in place (read-only); using step {step}"
                        )
                elif failed:
                    self._move_aside(failed, f"resuming from step {step}")
                return state, step
            if outcome == _DAMAGED:
                failed.append((step, detail or "damaged on another process"))
        if not failed:
            return None, None
        listing = ", ".join(f"{s} ({d})" for s, d in failed)
        if self.read_only:
            raise UsageError(
                f"no checkpoint in {self.directory} can be restored: {listing}; nothing was changed"
            )
        if not start_over:
            raise UsageError(
                f"no checkpoint in {self.directory} can be restored: {listing}; nothing was "
                "changed. Check the files, or pass --start_over to move them to "
                f"{self.corrupt_directory} and train from step 0"
            )
        self._move_aside(failed, "starting from step 0 (--start_over)")
        return None, None

    def _agreed_steps(self) -> list[int]:
        """Process 0's list of complete checkpoints, the same on every process."""
        steps = np.asarray(self.all_steps(), np.int64)
        if jax.process_count() == 1:
            return steps.tolist()
        count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
        padded = np.zeros(count, np.int64)
        padded[: min(count, len(steps))] = steps[:count]
        return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tolist()

    def _move_aside(self, failed: list[tuple[int, str]], then: str) -> None:
        """Moves unreadable checkpoints to ``<directory>.corrupt/`` (process 0), warning once
        for each."""
        self._check_writable("move checkpoints aside")
        self._manager.close()
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            stamp = int(time.time())
            for step, detail in failed:
                src = os.path.join(self.directory, str(step))
                dst = os.path.join(self.corrupt_directory, f"{step}-{stamp}")
                if os.path.exists(src):
                    shutil.move(src, dst)
                _warn(
                    f"checkpoint {step} in {self.directory} cannot be restored ({detail}); "
                    f"moved to {dst}; {then}"
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ddpm_jax.checkpoint.move_aside")
        self._manager = self._make_manager()


# Outcomes of reading a checkpoint, ordered by severity (every process takes the worst).
_OK, _VANISHED, _DAMAGED, _MISMATCH, _FAULT, _DENIED = range(6)
_OUTCOME = {DAMAGED: _DAMAGED, DENIED: _DENIED, FAULT: _FAULT}


def _worst_over_processes(outcome: int) -> int:
    """The most severe outcome of any process (every process must call this)."""
    if jax.process_count() == 1:
        return outcome
    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def _shapes(tree: PyTree) -> dict[str, tuple]:
    """``{"a/b/0/c": (shape, dtype)}`` of a pytree of arrays or array metadata."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        "/".join(name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
        for path, leaf in leaves
    }


__all__ = ["Checkpointer"]
