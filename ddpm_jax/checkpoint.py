"""Orbax checkpoints of the training state that never lose work, and preemption notices.

:class:`Checkpointer` wraps an ``ocp.CheckpointManager``:

- saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the caller
  may donate the state's buffers right away; the write to disk continues in the background);
- the last ``max_to_keep`` checkpoints are kept;
- an interrupted save leaves only an Orbax temporary directory, which is ignored and cleaned up;
- :meth:`Checkpointer.restore_latest` restores the newest checkpoint that can be read: a
  corrupt or incomplete one produces a warning, is moved aside to ``<directory>.corrupt/``
  (never deleted) and the previous one is tried, and so on.

Every process must call every method (Orbax synchronises them); only process 0 writes the
shared metadata and moves corrupt checkpoints.

:class:`PreemptionGuard` turns SIGTERM into a stop request that every process sees at the same
step, so that the run loop can save and exit cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Asynchronous Orbax checkpoints of a pytree in ``directory``, one per saved step.

    Args:
      directory: checkpoint directory (created); steps are sub-directories named by number.
      max_to_keep: number of most recent checkpoints kept.
      async_save: write in a background thread (``save`` returns after the host copy).
      replica_parallel: let the replicas of a replicated array each write a slice of it
        (Orbax's replica-parallel saving). None: off on CPU, where all replicas share one host
        memory and the slicing only costs a compilation per array shape; Orbax's default
        elsewhere.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int,
        async_save: bool = True,
        replica_parallel: bool | None = None,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.corrupt_directory = self.directory + ".corrupt"
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
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handler)

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
        """
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
        ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set)."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
        return self._manager.restore(step, args=args)

    def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree | None, int | None]:
        """Restores the newest readable checkpoint, falling back past corrupt ones.

        A checkpoint that fails to restore is reported with a warning and moved to
        ``<directory>.corrupt/<step>-<unix time>`` so that training can save that step again.

        Args:
          abstract_state: see :meth:`restore`.

        Returns:
          ``(state, step)``, or ``(None, None)`` when no checkpoint can be restored.
        """
        bad: list[int] = []
        result: tuple[PyTree | None, int | None] = (None, None)
        for step in reversed(self.all_steps()):
            try:
                result = (self.restore(step, abstract_state), step)
                break
            except Exception as e:  # noqa: BLE001 - any failure means "not restorable".
                detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
                _warn(
                    f"checkpoint {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {detail[:300]}); moving it to "
                    f"{self.corrupt_directory} and falling back to an earlier one"
                )
                bad.append(step)
        if bad:
            self._move_aside(bad)
        if bad and result[1] is None:
            _warn("no readable checkpoint left: starting from scratch")
        return result

    def _move_aside(self, steps: list[int]) -> None:
        self._manager.close()
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            stamp = int(time.time())
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if os.path.exists(src):
                    shutil.move(src, os.path.join(self.corrupt_directory, f"{step}-{stamp}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ddpm_jax.checkpoint.move_aside")
        self._manager = self._make_manager()


class PreemptionGuard:
    """SIGTERM -> a stop request, agreed on by all processes (a context manager).

    Single process: a Python SIGTERM handler sets a flag (installed on entry, the previous
    handler restored on exit; only from the main thread). Several processes: JAX's preemption
    service, which ``jax.distributed.initialize`` starts and which catches SIGTERM itself, makes
    every process see the request at the same step.

    Call :meth:`reached` with the same, increasing step on every process after each training call.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``."""
        if not self._multi:
            return self.requested
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is disabled
            return False

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = ["Checkpointer", "PreemptionGuard"]
