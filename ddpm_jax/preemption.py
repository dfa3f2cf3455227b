"""Preemption notices: SIGTERM becomes a stop request that every process of a job sees at once.

A preempted job gets SIGTERM (SLURM, Kubernetes, TPU maintenance) and some seconds to stop. Every
phase of a run asks :meth:`PreemptionGuard.reached` at its natural checkpoints (after each compiled
training call, after each sampling round, between phases) and stops cleanly when it says so:
training saves a checkpoint of the current step, sampling writes nothing final, and the same
command later resumes.

- One process: a Python SIGTERM handler sets a flag (installed on entry, the previous handler
  restored on exit; only from the main thread).
- Several processes: JAX's preemption service, which ``jax.distributed.initialize`` starts and
  which catches SIGTERM itself (on any process), makes every process see the notice at the same
  call. Its sync point is "the fastest process's call counter + 1", matched exactly, so the
  counter passed to it is this process's count of :meth:`~PreemptionGuard.reached` calls (the
  same on every process, since they run the same phases), never a training step, which can jump
  by ``train.steps_per_call`` and miss the sync point.

Once :meth:`~PreemptionGuard.reached` returned True, :attr:`~PreemptionGuard.requested` stays True
on every process, so later phases stop too without another agreement.
"""

from __future__ import annotations

import itertools
import signal
import threading

import jax
from jax.experimental import multihost_utils

# This process's count of agreement points (shared by nested guards and successive phases; JAX's
# preemption service needs one increasing counter for the process's whole life), and whether the
# processes agreed on a notice (the service answers True once, at its sync point).
_calls = itertools.count(1)
_agreed = threading.Event()


class PreemptionGuard:
    """SIGTERM -> a stop request, agreed on by all processes (a context manager).

    Guards nest (a run's whole lifetime around each phase's loop): a notice reaches every guard
    that is active, and a guard entered after a notice starts requested.
    """

    def __init__(self):
        self._requested = False
        self._multi = jax.process_count() > 1
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            outer = self._outer()
            self._requested = outer is not None and outer.requested
        return self

    @property
    def requested(self) -> bool:
        """Whether a stop was requested (one process) or agreed on (several)."""
        return _agreed.is_set() if self._multi else self._requested

    def _outer(self) -> PreemptionGuard | None:
        outer = getattr(self._previous, "__self__", None)
        return outer if isinstance(outer, PreemptionGuard) else None

    def _handler(self, signum, frame) -> None:
        self._requested = True
        if self._outer() is not None:
            self._previous(signum, frame)

    def reached(self) -> bool:
        """Whether to stop now. Every process must call it at the same points of the run (after
        each compiled training call, each sampling round, between phases)."""
        if self.requested or not self._multi:
            return self.requested
        try:
            if multihost_utils.reached_preemption_sync_point(next(_calls)):
                _agreed.set()
        except RuntimeError:  # the preemption service is disabled
            return False
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = ["PreemptionGuard"]
