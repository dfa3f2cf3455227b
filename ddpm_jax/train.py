"""The training run: ``run(config, workdir)`` trains, checkpoints, resumes and samples.

``run`` validates the config and builds every object of the run (``ddpm_jax.builders``) before
anything is compiled or written, then writes into ``workdir``:

- ``config.json``: the config used;
- ``metrics.jsonl``: one JSON object per logged step (``step, loss, grad_norm, lr,
  steps_per_sec, elapsed_s``); ``step`` counts completed updates (1-based);
- ``samples/step_XXXXXXX.png``: grids of EMA samples with a fixed noise seed, every
  ``train.sample_every`` steps (a folder run's class names above their columns,
  ``ddpm_jax.grid_names``);
- ``checkpoints/``: Orbax checkpoints every ``train.checkpoint_every`` steps and at the end;
- ``samples.npz`` at the end: ``images`` uint8 ``[N, H, W, C]`` and ``labels`` int32 ``[N]`` (the
  requested class of each sample, classes cycled, or -1 for an unconditional model), drawn from
  the EMA parameters with the ``sample.*`` settings (classifier-free guidance with
  ``sample.guidance_scale`` for conditional models), sharded over all devices.

Running it again on the same ``workdir`` resumes from the newest readable checkpoint with exactly
the state, data order and randomness of an uninterrupted run (``metrics.jsonl`` is cut back to the
checkpoint); on a finished run it only writes missing final outputs. The config may change between
invocations within the limits of ``ddpm_jax.resume``; ``config_history.jsonl`` records each change
(with the ``--allow_change`` fields) and, once the batch size changed, the data position.
SIGTERM saves a checkpoint at the current step and returns ``status="preempted"``. A non-finite
loss or gradient norm stops the run with :class:`~ddpm_jax.errors.NonFiniteLossError` before
anything non-finite is saved.

Only process 0 writes logs and images; every process takes part in training, checkpointing and
sampling. Events (logging, checkpoints, grids) fire at the end of the compiled call in which their
step is reached (``train.steps_per_call`` steps per call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ddpm_jax import builders, data, grid_names, images, parallel, resume
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.errors import NonFiniteLossError, UsageError
from ddpm_jax.evaluation.during_training import PeriodicEvaluation, summary
from ddpm_jax.failures import write_failure
from ddpm_jax.generate import Generator
from ddpm_jax.preemption import PreemptionGuard
from ddpm_jax.records import RunRecords
from ddpm_jax.run_start import RunStart, prepare, record_start
from ddpm_jax.workdir import FINAL_TAG, GRID_TAG, format_duration, is_writer, log, run_key, save_npz

_MAX_PENDING_CALLS = 64  # fetch metrics at least this often (bounds host memory)


@dataclasses.dataclass
class RunResult:
    """What :func:`run` did.

    Attributes:
      status: "completed", "preempted" or "already_complete".
      step: completed updates at return.
      workdir: absolute work directory.
      metrics_path: ``metrics.jsonl``.
      samples_path: ``samples.npz``, or None (not written: ``sample.num_samples = 0``, preempted).
      ema_params: the EMA parameters at return, replicated (gathered under ``parallel="fsdp"``).
    """

    status: str
    step: int
    workdir: str
    metrics_path: str
    samples_path: str | None
    ema_params: Any = None


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    step_callback: Callable[[int], None] | None = None,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
) -> RunResult:
    """Trains (or resumes) the diffusion model of ``config`` in ``workdir`` (created): the
    preparation (``run_start.prepare``: config, workdir, lock, resume; ``start_over`` and
    ``allow_change`` are its), the dataset and UNet of ``config``, then :func:`train`. Nothing
    in ``workdir`` is written before the newest readable checkpoint has been restored; after a
    change of ``train.batch_size`` the batches continue the data stream from the examples
    already seen (``resume.data_position``). Returns a :class:`RunResult`.

    Raises:
      UsageError: invalid config, workdir or data, found before anything is compiled.
      NonFiniteLossError: the loss or gradient norm became non-finite.
    """
    with prepare(config, workdir, start_over=start_over, allow_change=allow_change) as start:
        ds = builders.build_dataset(config)
        model = builders.build_model(config, ds.num_classes)
        return train(config, start, ds, model, step_callback=step_callback)


def train(
    config: ml_collections.ConfigDict,
    start: RunStart,
    dataset: data.Dataset,
    model: nn.Module,
    *,
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    label_classes: np.ndarray | None = None,
    step_callback: Callable[[int], None] | None = None,
    init_params: Any = None,
) -> RunResult:
    """The run loop of a run prepared by ``run_start.prepare`` (inside its block): ``start``.

    Args:
      dataset: the training batches (:func:`run`: ``builders.build_dataset``; a latent run: its
        encoded latents, ``data.array_dataset``).
      model: the network: the UNet's call ``apply(vars, x, t, y=None, train=False)`` and a
        ``null_label`` (None, or the null condition's label), e.g. a ``PromptUNet``.
      decode_fn: optional jittable map of sampled arrays to images ``[B, H, W, C]`` in [-1, 1]
        (a frozen VAE decoder), applied before the grids and ``samples.npz``.
      label_classes: ``[num_labels]`` int32, the dataset class each conditioning label stands
        for (a latent run's prompts), for evaluation; None: the labels are the classes.
      step_callback: optional ``callback(step)`` called on every process after each compiled
        call with the number of completed updates (tests use it to interrupt runs).
      init_params: a new run's parameters (fine-tuning) instead of a fresh initialisation.
    """
    with PreemptionGuard() as preemption:
        options = dict(decode_fn=decode_fn, label_classes=label_classes, init_params=init_params)
        trainer = Trainer(config, start, dataset, model, preemption, **options)
        try:
            result = trainer.run(step_callback)
        except BaseException:
            trainer.close(raise_errors=False)  # the first error is the one to report
            raise
        trainer.close()
    return result


class Trainer:
    """Every piece of one run, built before anything is compiled or written, and its loop;
    the arguments are :func:`train`'s and the active guard whose notices stop the run."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        start: RunStart,
        ds: data.Dataset,
        model: nn.Module,
        preemption: PreemptionGuard,
        *,
        decode_fn: Callable[[jax.Array], jax.Array] | None = None,
        label_classes: np.ndarray | None = None,
        init_params: Any = None,
    ):
        self.config, self.start, self.ds, self.model = config, start, ds, model
        self.workdir, self.preemption, self.init_params = start.workdir, preemption, init_params
        self.label_names = grid_names.label_names(self.workdir, label_classes)  # a folder run's
        self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        self.samples_path = os.path.join(self.workdir, "samples.npz")
        self.dp = builders.build_parallel(config)
        self.schedule = builders.build_schedule(config)
        self.optimizer, lr_schedule = builders.build_optimizer(config)
        self.init = builders.init_state_fn(config, model, self.optimizer, ds.image_shape)
        # Tracing the initialisation checks the model against the data (nothing is computed).
        self.abstract_state = builders.abstract_state(self.init, self.dp)
        self.train_fn = builders.build_train_step(
            config, model, self.schedule, self.optimizer, lr_schedule, self.dp
        )
        self.generator = Generator(
            model,
            self.schedule,
            self.dp,
            ds.image_shape,
            builders.sample_settings(config),
            prediction=config.diffusion.prediction,
            formulation=builders.formulation(config),
            decode_fn=decode_fn,
        )
        self.evaluation = None
        if "eval" in config and config.eval.every > 0:
            output_shape = ds.image_shape
            if decode_fn is not None:
                x = jax.ShapeDtypeStruct((1, *ds.image_shape), jax.numpy.float32)
                output_shape = jax.eval_shape(decode_fn, x).shape[1:]
            self.evaluation = PeriodicEvaluation(
                config, self.generator, output_shape, label_classes
            )
        self.tty = is_writer() and sys.stdout.isatty()
        self.ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints
        )

    def close(self, raise_errors: bool = True) -> None:
        """Waits for pending checkpoint writes and releases the checkpointer."""
        try:
            self.ckpt.close()
        except Exception:
            if raise_errors:
                raise

    def run(self, step_callback) -> RunResult:
        """Restores or initialises, trains, samples; SIGTERM at any point after the restore
        saves the current step (when training) and returns ``status="preempted"``.

        Args:
          step_callback: see :func:`train`.
        """
        try:
            return self._run(step_callback)
        except Exception as e:
            # A full disk may surface from Orbax's background write as a tensorstore error.
            unwritable = write_failure(e)
            if unwritable is None:
                raise
            kept = self.ckpt.latest_step()
            kept = "none was written" if kept is None else f"step {kept}"
            raise UsageError(
                f"cannot write in {self.workdir}: {unwritable}; the last complete "
                f"checkpoint is {kept} in {self.ckpt.directory}. Free space or fix the "
                "permissions, then run the same command again"
            ) from e

    def _run(self, step_callback):
        tc, changes, prepared = self.config.train, self.start.changes, self.start
        had_checkpoints = bool(self.ckpt.all_steps())
        state, start = self.ckpt.restore_latest(self.abstract_state, start_over=prepared.start_over)
        if state is None:
            state, start = builders.init_state(self.init, self.abstract_state, self.init_params), 0
            log(f"new run in {self.workdir} ({self.dp.num_devices} devices, {self.dp.kind})")
        else:
            log(f"resuming from the checkpoint of step {start} in {self.ckpt.directory}")
        size = parallel.state_bytes(state)  # from the arrays' shards on this process's devices
        log(
            f"training state ({self.dp.kind}): {size['per_device']:,} bytes per device of "
            f"{size['total']:,} ({size['replicated']:,} replicated on every device)"
        )
        batch = tc.batch_size
        saved_batch = changes.get("train.batch_size", (batch, batch))[0]
        position = resume.data_position(prepared.history, start, saved_batch, batch)
        if is_writer():  # the restore succeeded: now the run's files may change
            started_over = (had_checkpoints or prepared.lost) and start == 0
            record_start(
                self.workdir, self.config, start, changes, position, self.ds.num_examples,
                started_over=started_over,
            )  # fmt: skip
        os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        with contextlib.closing(RunRecords(self.workdir, start)) as records:
            return self._train(state, start, position, records, step_callback)

    def _train(self, state, start: int, position, records: RunRecords, step_callback):
        tc, changes = self.config.train, self.start.changes
        if start >= tc.num_steps:
            log(f"training already finished (step {start} >= train.num_steps={tc.num_steps})")
            path = self._final_samples(state, overwrite=False)
            changed = sorted(f for f in changes if f.startswith("sample."))
            if path and changed:
                log(
                    f"{path} is kept as written: the changed {', '.join(changed)} do not apply "
                    "to a finished run's samples; draw samples with other settings with "
                    f"python -m experiments.sample --workdir={self.workdir}"
                )
            status = "preempted" if self.preemption.requested else "already_complete"
            ema = self.dp.gather(state.ema_params)
            return RunResult(status, start, self.workdir, self.metrics_path, path, ema)
        status, step, state = self._loop(
            self.dp.to_step(state), start, position.examples_seen, records, step_callback
        )
        path = None
        if status == "completed":
            self._write_report(records)
            path = self._final_samples(self.dp.from_step(state), overwrite=True)
            status = "preempted" if self.preemption.requested else status
        if status == "completed":
            samples = f"; samples: {path}" if path else ""
            log(
                f"done: {step} steps. metrics: {self.metrics_path}; sample grids: "
                f"{self.workdir}/samples/{samples}; checkpoints: {self.ckpt.directory}"
            )
        ema = self.dp.gather(self.dp.from_step(state).ema_params)
        return RunResult(status, step, self.workdir, self.metrics_path, path, ema)

    def _loop(self, state, start: int, examples_seen: int, records: RunRecords, step_callback):
        tc, dp, ckpt = self.config.train, self.dp, self.ckpt
        local_b = self.ds.local_batch_size
        index = (jax.process_index() * local_b + np.arange(local_b)).astype(np.int32)
        if examples_seen == start * self.ds.global_batch_size:
            batches = self.ds.iterator(start)
        else:  # the batch size changed: continue the stream after the examples seen
            batches = self.ds.iterator(start, examples_seen=examples_seen)
        pending: list[tuple[int, dict]] = []  # (first step, metrics on device), not yet checked
        step, last_saved = start, start
        window = [time.time(), start]
        t_start, tty = time.time(), self.tty

        def flush() -> None:
            """Fetches the pending metrics, stops on a non-finite one, logs the log steps."""
            if not pending:
                return
            fetched = [(first, dp.metrics_to_host(m)) for first, m in pending]
            pending.clear()
            now = time.time()
            sps = (step - window[1]) / max(now - window[0], 1e-9)
            window[:] = [now, step]
            for first, m in fetched:
                for j, (loss, gnorm) in enumerate(zip(m["loss"], m["grad_norm"], strict=True)):
                    s = first + j + 1
                    if not (math.isfinite(loss) and math.isfinite(gnorm)):
                        kept = ckpt.latest_step()
                        kept = "none was written" if kept is None else f"step {kept}, kept"
                        raise NonFiniteLossError(
                            f"training stopped: non-finite loss={loss} / grad_norm={gnorm} at "
                            f"step {s}; last good checkpoint: {kept} in {ckpt.directory}; "
                            "lower train.lr or raise train.warmup_steps"
                        )
                    if s % tc.log_every == 0 and is_writer():
                        record = dict(step=s, loss=float(loss), grad_norm=float(gnorm))
                        record.update(lr=float(m["lr"][j]), steps_per_sec=sps)
                        record.update(elapsed_s=now - t_start)
                        records.scalars(record)
                        eta = format_duration((tc.num_steps - s) / sps if sps > 0 else None)
                        line = f"step {s}/{tc.num_steps} | loss {loss:.4f} | {sps:.2f} steps/s"
                        if tty:  # one progress line, rewritten in place
                            print(f"\r{line} | ETA {eta}", end="", flush=True)
                        else:
                            print(f"{line} | ETA {eta}", flush=True)

        def save() -> None:
            nonlocal last_saved
            flush()  # never save a state after a non-finite loss
            if last_saved != step:
                ckpt.save(step, dp.from_step(state))
                last_saved = step

        while step < tc.num_steps:
            k = min(tc.steps_per_call, tc.num_steps - step)
            local = [next(batches) for _ in range(k)]
            batch = {
                "image": np.stack([b["image"] for b in local]),
                "label": np.stack([b["label"] for b in local]),
                "index": np.tile(index, (k, 1)),
            }
            state, metrics = self.train_fn(state, dp.shard_batch(batch))
            pending.append((step, metrics))
            prev, step = step, step + k
            crossed = lambda every, a=prev, b=step: every > 0 and b // every > a // every
            if crossed(tc.log_every) or len(pending) >= _MAX_PENDING_CALLS:
                flush()
            if step_callback is not None:
                step_callback(step)
            if not self.preemption.reached():
                if crossed(tc.checkpoint_every) or step == tc.num_steps:
                    save()
                if self.config.sample.grid_size > 0 and crossed(tc.sample_every):
                    self._sample_grid(state, step, records)
                if self.evaluation is not None and (
                    crossed(self.config.eval.every) or step == tc.num_steps
                ):
                    self._evaluate(state, step, records)  # stops early on a preemption notice
            if self.preemption.requested:
                save()
                ckpt.wait()
                log(
                    f"{chr(10) if tty else ''}preempted (SIGTERM): saved the checkpoint of "
                    f"step {step} in {ckpt.directory}; run the same command again to resume"
                )
                return "preempted", step, state
        flush()
        if tty:
            log()
        ckpt.wait()
        return "completed", step, state

    def _sample_grid(self, state, step: int, records: RunRecords) -> None:
        g = self.config.sample.grid_size
        ema = self.dp.from_step(state.ema_params)
        imgs, labels = self.generator(ema, run_key(self.config.seed, GRID_TAG), g * g)
        if is_writer():  # column j: class j (cycled), named above it in a folder run
            grid = grid_names.labelled_grid(imgs, g, labels, self.label_names)
            images.save_png(f"{self.workdir}/samples/step_{step:07d}.png", grid)
            records.image("samples", grid, step)

    def _evaluate(self, state, step: int, records: RunRecords) -> None:
        """FID / KID (and accuracy) of EMA samples into the records, and the report plot."""
        ema = self.dp.gather(self.dp.from_step(state.ema_params))
        record = self.evaluation(ema, step, should_stop=self.preemption.reached)
        if record is None:
            log(f"{chr(10) if self.tty else ''}preempted (SIGTERM) while evaluating step {step}")
            return
        records.scalars(record)
        tc = self.config.train
        log(f"{chr(10) if self.tty else ''}step {step}/{tc.num_steps} | eval: {summary(record)}")
        self._write_report(records)

    def _write_report(self, records: RunRecords) -> None:
        """``report.png``: the loss (and evaluation metrics) against the step (process 0)."""
        if is_writer() and records.metrics.read():
            from ddpm_jax.evaluation.report import plot_run  # matplotlib: only when plotting

            plot_run(self.workdir, os.path.join(self.workdir, "report.png"))

    def _final_samples(self, state, *, overwrite: bool) -> str | None:
        """Writes ``samples.npz`` from the EMA parameters of ``state`` (in the layout's state
        shardings: the generator gathers them); None when there are none to write or a
        preemption notice stopped the sampling."""
        s = self.config.sample
        if s.num_samples == 0:
            return None
        if os.path.exists(self.samples_path) and not overwrite:
            log(f"final samples already written: {self.samples_path}")
            return self.samples_path
        log(f"sampling {s.num_samples} images ({s.method}, {s.num_steps} steps)")
        key = run_key(self.config.seed, FINAL_TAG)
        stop = self.preemption.reached
        out = self.generator(state.ema_params, key, s.num_samples, should_stop=stop)
        if out is None:
            log("preempted (SIGTERM) while sampling: samples.npz not written")
            return None
        if is_writer():
            save_npz(self.samples_path, images=out[0], labels=out[1])
        return self.samples_path


__all__ = ["RunResult", "Trainer", "run", "train"]
