"""The work directory of a run: atomic writes, ``metrics.jsonl``, process-0 output, RNG tags.

Everything a run writes goes through here, so the rules hold in one place:

- writes are atomic: a temporary file in the same directory, flushed and ``fsync``-ed, then
  ``os.replace``-d over the target, so a reader (or a run killed mid-write) sees the old file or
  the new one, never a part (:func:`atomic_open`, :func:`write_json`, :func:`save_npz`);
- only process 0 writes shared files and prints (:func:`is_writer`, :func:`log`, :func:`warn`);
- one training job at a time: process 0 holds an exclusive lock on the directory for the whole
  run (:func:`trainer_lock`); readers (sampling, evaluation) take none;
- ``metrics.jsonl`` and ``config_history.jsonl`` are appended line by line, and cut back to a
  restored step (:class:`JsonLines`);
- the RNG tags, every key of a run in one list: training step ``s`` draws example ``i``'s
  timestep, noise and label dropout from ``fold_in(fold_in(key(seed), s), i)`` and the dropout
  masks from ``fold_in(fold_in(key(seed), s), B)`` (``ddpm_jax.state``); the data order is
  ``seed``'s (``ddpm_jax.data``); the root keys of initialisation, sample grids, final samples,
  evaluation, the autoencoder and a latent run's other prompts are ``run_key(seed, TAG)`` =
  ``fold_in(key(seed), TAG)`` with the ``*_TAG`` below, far above any step index ``s``; sample
  ``j`` of a sampling call draws from ``fold_in(root, j)`` alone (``ddpm_jax.generate``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax.errors import UsageError

# fold_in tags of the root key, far above any step index s of fold_in(key(seed), s).
INIT_TAG = 2_000_000_001  # model initialisation
GRID_TAG = 2_000_000_002  # the sample grids written during training
FINAL_TAG = 2_000_000_003  # the final samples (samples.npz, per-prompt samples)
EVAL_TAG = 2_000_000_004  # evaluation samples
VAE_TAG = 2_000_000_005  # the autoencoder of a latent run (initialisation and training)
PROMPT_TAG = 2_000_000_006  # a latent run's samples of prompts it was not trained on


def run_key(seed: int, tag: int) -> jax.Array:
    """``fold_in(key(seed), tag)``: the root key of one kind of randomness of a run."""
    return jax.random.fold_in(jax.random.key(seed), tag)


# ----------------------------------------------------------------------------- output


def is_writer() -> bool:
    """Whether this process writes shared files and prints (process 0)."""
    return jax.process_index() == 0


def log(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only, flushed."""
    if is_writer():
        print(*args, **kwargs, flush=True)


def warn(message: str) -> None:
    """``warning: message`` on stderr, process 0 only."""
    if is_writer():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def format_duration(seconds: float | None) -> str:
    """``"1d 02:03:04"`` / ``"2:03:04"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    days, rest = divmod(int(seconds), 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


# ----------------------------------------------------------------------------- atomic writes


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file next to ``path``; on success it replaces ``path`` atomically.

    The parent directory is created. On an exception the temporary file is removed and ``path``
    is left as it was.

    Args:
      path: the destination file.
      mode: ``"wb"`` or ``"w"``.

    Yields:
      The open temporary file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp's is 0o600)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON object in ``path``; None when the file is missing or not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> str:
    """``np.savez(path, **arrays)``, atomically. Returns ``path``."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return os.fspath(path)


# ----------------------------------------------------------------------------- metrics.jsonl


class JsonLines:
    """A ``.jsonl`` record of a run (``metrics.jsonl``, ``config_history.jsonl``): one JSON object
    per line, each with an integer ``"step"``.

    Args:
      path: the file (created on the first append or cut).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def append(self, record: dict) -> None:
        """Appends one line (``record`` must have ``"step"``)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The records in file order; a line cut short by a kill is skipped."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records

    def cut(self, up_to_step: int) -> None:
        """Keeps the records of steps ``<= up_to_step`` (a resumed run writes the rest again)."""
        kept = [r for r in self.read() if r["step"] <= up_to_step]
        with atomic_open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


# ----------------------------------------------------------------------------- the directory


def check_workdir(workdir: str | os.PathLike | None) -> str:
    """Checks that ``workdir`` is given and is, or can be created as, a writable directory.

    Nothing is created. Returns the absolute path.

    Raises:
      UsageError: missing, not a directory, or not writable.
    """
    if workdir is None or not str(workdir).strip():
        raise UsageError("workdir is missing: pass --workdir=DIR (created if needed)")
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"workdir={path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"workdir={path!r} is not writable")
        return path
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"workdir={path!r} cannot be created: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"workdir={path!r} cannot be created: {parent!r} is not writable")
    return path


# ----------------------------------------------------------------------------- one trainer

LOCK_FILE = ".trainer.lock"

# The locks this process holds ({lock path: [open file or None, depth]}): a run's phases (the
# command line, then train.run inside it) re-enter the lock instead of blocking on themselves.
_held: dict[str, list] = {}


@contextlib.contextmanager
def trainer_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds the exclusive lock of a training job on ``workdir`` (created) while in the block.

    Process 0 takes an ``fcntl.flock`` on ``workdir/.trainer.lock``, which the kernel releases
    when the process ends however it ends (kill -9 leaves no stale lock), and writes its pid and
    host into it; the other processes of the job learn the outcome from process 0. Re-entrant
    within a process. Readers of a run (sampling, evaluation) take no lock. A work directory the
    lock created is removed again when the run wrote nothing into it (a mistake found late).

    Raises:
      UsageError: another process holds the lock; the message names its pid and host.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    path = os.path.join(workdir, LOCK_FILE)
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    f, holder = None, ""
    created = not os.path.exists(workdir)
    if is_writer():
        os.makedirs(workdir, exist_ok=True)
        f = open(path, "a+")  # never truncated before the lock is ours
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            f = None
        else:
            f.seek(0)
            f.truncate()
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n")
            f.flush()
    busy = bool(holder)
    if jax.process_count() > 1:
        busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    if busy:
        if f is not None:
            f.close()
        raise UsageError(
            f"workdir={workdir!r} is being trained by another job ({holder or 'see ' + path}); "
            "nothing was changed. Wait for it to end or stop it, or use another --workdir"
        )
    _held[path] = [f, 1]
    try:
        yield
    finally:
        del _held[path]
        if f is not None:
            if created and os.listdir(workdir) == [LOCK_FILE]:  # a run that wrote nothing
                os.remove(path)
                os.rmdir(workdir)
            f.close()  # releases the lock; the file stays (removing it would race a new holder)


__all__ = [
    "EVAL_TAG",
    "FINAL_TAG",
    "GRID_TAG",
    "INIT_TAG",
    "LOCK_FILE",
    "PROMPT_TAG",
    "VAE_TAG",
    "JsonLines",
    "atomic_open",
    "check_workdir",
    "format_duration",
    "is_writer",
    "log",
    "read_json",
    "run_key",
    "save_npz",
    "trainer_lock",
    "warn",
    "write_json",
]
