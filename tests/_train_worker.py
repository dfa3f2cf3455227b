"""Subprocess entry for the training tests: a tiny digits run through ``ddpm_jax.cli.main``.

Usage: ``python tests/_train_worker.py --workdir=DIR [--config.*=...] [--coordinator_address=...
--num_processes=N --process_id=I] [fault flags]``

Fault flags (stripped before the CLI sees the flags), deterministic stand-ins for what happens to
real runs:

- ``--signal_at=STEP:SIGKILL|SIGTERM``: the process sends itself the signal right after the
  compiled call that completes update ``STEP`` (a kill or a preemption notice between
  checkpoints);
- ``--kill_in_save=STEP``: SIGKILL right after the checkpoint of ``STEP`` started writing (its
  files are incomplete on disk);
- ``--unreadable_on_process=P:STEP``: process ``P`` cannot read checkpoint ``STEP`` (as if its view
  of the shared filesystem were damaged);
- ``--fail_writes_at=STEP``: saving the checkpoint of ``STEP`` fails with ENOSPC (a full disk);
- ``--sleep_per_call=SECONDS``: a slower run (sleeps after every compiled training call);
- ``--signal_in_sampling=SIGTERM``: the process sends itself the signal after the first round of
  every sampling call that can be stopped (the final samples, evaluations).

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


def _disk_full(original, self, step, state):
    raise OSError(errno.ENOSPC, "No space left on device", f"{self.directory}/{step}")


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
            return should_stop()

        return original(self, *args, should_stop=stop, **kwargs)

    Generator.__call__ = call


def _unreadable_on(process_and_step: str) -> None:
    process, step = (int(v) for v in process_and_step.split(":"))
    original = Checkpointer._read

    def read(self, s, abstract_state):
        if s == step and jax.process_index() == process:
            raise OSError(errno.EIO, "Input/output error (test)", f"{self.directory}/{s}")
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


def main(argv: list[str]) -> None:
    hook = None
    rest = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--signal_at":
            hook = _signal_hook(value)
        elif name == "--kill_in_save":
            _patch_save(int(value), _kill_in_save)
        elif name == "--fail_writes_at":
            _patch_save(int(value), _disk_full)
        elif name == "--sleep_per_call":
            hook = lambda done, s=float(value): time.sleep(s)
        elif name == "--signal_in_sampling":
            _signal_in_sampling(value)
        elif name == "--unreadable_on_process":
            _unreadable_on(value)
        elif name == "--print_first_batch":
            _print_first_batch()
        else:
            rest.append(arg)
    if hook is not None:
        train.run = functools.partial(train.run, step_callback=hook)
    cli.main(tiny_config, rest)


if __name__ == "__main__":
    main(sys.argv)
