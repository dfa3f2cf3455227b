"""Subprocess entry for the training tests: a tiny digits run through ``ddpm_jax.cli.main``.

Usage: ``python tests/_train_worker.py --workdir=DIR [--config.*=...] [--coordinator_address=...
--num_processes=N --process_id=I] [fault flags]``

Fault flags (stripped before the CLI sees the flags), deterministic stand-ins for what happens to
real runs:

- ``--signal_at=STEP:SIGKILL|SIGTERM``: the process sends itself the signal right after the
  compiled call that completes update ``STEP`` (a kill or a preemption notice between
  checkpoints);
- ``--sleep_per_step=SECONDS``: the process sleeps after each compiled call (a slow run, for
  readers to overlap with; the results are unchanged);
- ``--kill_in_save=STEP``: SIGKILL right after the checkpoint of ``STEP`` started writing (its
  files are incomplete on disk);
- ``--unreadable_on_process=P:STEP``: process ``P`` finds checkpoint ``STEP`` damaged (reading it
  raises what tensorstore raises for a truncated data file), as if its view of the shared
  filesystem were damaged;
- ``--restore_fault=STEP:permission|eio|oom``: reading checkpoint ``STEP`` fails with a permission
  error, an I/O error (EIO) or a device out-of-memory error (a fault, not damage);
- ``--fill_disk_at=STEP:PATH``: before the checkpoint of ``STEP`` is saved (the earlier ones
  complete on disk), the file ``PATH`` is written until its filesystem is full, so that Orbax's
  background write really fails with ENOSPC (``PATH`` on a small tmpfs);
- ``--signal_in_sampling=SIGTERM``: the process sends itself the signal after the first round of
  every sampling call that can be stopped (the final samples, evaluations), then waits 2 s (the
  length of a real round) before the round's stop check.

and a probe: ``--print_first_batch`` prints, for each data iterator the run opens, a line
``first batch: start_step=S examples_seen=N labels=[...] sha256=...`` (the labels and the
image bytes of its first batch), so that a test can check where the data stream continued.

The parent sets ``XLA_FLAGS`` (device count) and ``JAX_PLATFORMS``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import cli, data, train  # noqa: E402
from ddpm_jax.checkpoint import Checkpointer  # noqa: E402
from ddpm_jax.config import default_config  # noqa: E402
from ddpm_jax.generate import Generator  # noqa: E402


def tiny_config():
    """A config that trains in seconds on CPU: 8x8 digits, a one-level class-conditional UNet of
    width 16, classifier-free guided DDIM samples."""
    c = default_config()
    c.data.name = "digits"
    c.model.ch = 16
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.num_groups = 8
    c.model.dropout = 0.0
    c.model.class_conditional = True  # label dropout in training, guided final samples
    c.diffusion.num_timesteps = 100
    c.diffusion.beta_start = 1e-3
    c.diffusion.beta_end = 0.2
    c.train.num_steps = 12
    c.train.batch_size = 16
    c.train.lr = 1e-3
    c.train.warmup_steps = 2
    c.train.ema_decay = 0.9
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.keep_checkpoints = 10
    c.train.sample_every = 0
    c.sample.num_samples = 16
    c.sample.num_steps = 4
    c.sample.grid_size = 4
    c.sample.batch_size = 16
    c.sample.guidance_scale = 2.0
    return c


def _signal_hook(step_and_signal: str):
    step, name = step_and_signal.split(":")
    step, signum = int(step), getattr(signal, name)

    def callback(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return callback


def _sleep_hook(seconds: str):
    return lambda done: time.sleep(float(seconds))


def _patch_save(step: int, action) -> None:
    original = Checkpointer.save

    def save(self, s, state):
        if s == step:
            return action(original, self, s, state)
        return original(self, s, state)

    Checkpointer.save = save


def _kill_in_save(original, self, step, state):
    started = original(self, step, state)
    os.kill(os.getpid(), signal.SIGKILL)
    return started


def _fill_disk(path: str):
    def action(original, self, step, state):
        self.wait()  # the earlier checkpoints are complete: only this one cannot be written
        with open(path, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        return original(self, step, state)

    return action


def _signal_in_sampling(name: str) -> None:
    signum, original = getattr(signal, name), Generator.__call__

    def call(self, *args, should_stop=None, **kwargs):
        if should_stop is None:
            return original(self, *args, **kwargs)
        sent = []

        def stop() -> bool:
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signum)
                # Under several processes the notice travels through JAX's coordination service
                # (an RPC) before any process sees it; a real sampling round lasts long enough
                # for it, the test's 8 tiny rounds may not: give it that time once.
                time.sleep(2.0)
            return should_stop()

        return original(self, *args, should_stop=stop, **kwargs)

    Generator.__call__ = call


def _patch_read(step: int, make_error, process: int | None = None) -> None:
    original = Checkpointer._read

    def read(self, s, abstract_state):
        if s == step and process in (None, jax.process_index()):
            raise make_error(f"{self.directory}/{s}")
        return original(self, s, abstract_state)

    Checkpointer._read = read


def _print_first_batch() -> None:
    original = data.ImageDataset.iterator

    def iterator(self, start_step=0, *, examples_seen=None):
        first, it = None, original(self, start_step, examples_seen=examples_seen)
        for batch in it:
            if first is None:
                first = batch
                digest = hashlib.sha256(np.ascontiguousarray(batch["image"])).hexdigest()
                print(
                    f"first batch: start_step={start_step} examples_seen={examples_seen} "
                    f"labels={batch['label'].tolist()} sha256={digest}",
                    flush=True,
                )
            yield batch

    data.ImageDataset.iterator = iterator


def _truncated(path: str) -> Exception:
    # What tensorstore raises for a truncated data file (a checkpoint's files are damaged).
    return ValueError(
        f'OUT_OF_RANGE: Error reading "params/.zarray" in OCDBT database at local file "{path}/"'
        " (test)"
    )


RESTORE_FAULTS = {
    "permission": lambda path: PermissionError(errno.EACCES, "Permission denied (test)", path),
    "eio": lambda path: OSError(errno.EIO, "Input/output error (test)", path),
    # What jax raises when a device runs out of memory (an XlaRuntimeError).
    "oom": lambda path: jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes (test)"
    ),
}


def main(argv: list[str]) -> None:
    hook = None
    rest = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--signal_at":
            hook = _signal_hook(value)
        elif name == "--sleep_per_step":
            hook = _sleep_hook(value)
        elif name == "--kill_in_save":
            _patch_save(int(value), _kill_in_save)
        elif name == "--fill_disk_at":
            step, _, path = value.partition(":")
            _patch_save(int(step), _fill_disk(path))
        elif name == "--unreadable_on_process":
            process, step = (int(v) for v in value.split(":"))
            _patch_read(step, _truncated, process)
        elif name == "--restore_fault":
            step, kind = value.split(":")
            _patch_read(int(step), RESTORE_FAULTS[kind])
        elif name == "--signal_in_sampling":
            _signal_in_sampling(value)
        elif name == "--print_first_batch":
            _print_first_batch()
        else:
            rest.append(arg)
    if hook is not None:
        train.run = functools.partial(train.run, step_callback=hook)
    cli.main(tiny_config, rest)


if __name__ == "__main__":
    main(sys.argv)
