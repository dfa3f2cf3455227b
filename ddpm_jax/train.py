"""The training run loop: ``run(config, workdir)`` trains, checkpoints, resumes and samples.

``run`` validates the config before anything is compiled, then writes into ``workdir``:

- ``config.json``: the config used;
- ``metrics.jsonl``: one JSON object per logged step (``step, loss, grad_norm, lr,
  steps_per_sec, elapsed_s``); ``step`` counts completed updates (1-based);
- ``samples/step_XXXXXXX.png``: grids of EMA samples with a fixed noise seed, every
  ``train.sample_every`` steps;
- ``checkpoints/``: Orbax checkpoints every ``train.checkpoint_every`` steps and at the end;
- ``samples.npz`` at the end: ``images`` uint8 ``[N, H, W, C]`` and ``labels`` int32 ``[N]`` (the
  requested class of each sample, classes cycled, or -1 for an unconditional model), drawn from
  the EMA parameters with the ``sample.*`` settings (classifier-free guidance with
  ``sample.guidance_scale`` for class-conditional models), sharded over all devices.

Running it again on the same ``workdir`` resumes from the newest readable checkpoint with exactly
the state, data order and randomness of an uninterrupted run (``metrics.jsonl`` is cut back to the
checkpoint); on a finished run it only writes missing final outputs. SIGTERM saves a checkpoint
at the current step and returns ``status="preempted"``. A non-finite loss or gradient norm stops
the run with :class:`NonFiniteLossError` before anything non-finite is saved.

Only process 0 writes logs and images; every process takes part in training, checkpointing and
sampling. Events (logging, checkpoints, grids) fire at the end of the compiled call in which their
step is reached (``train.steps_per_call`` steps per call).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import config as config_lib
from ddpm_jax import data, guidance, images, samplers, schedules
from ddpm_jax import state as state_lib
from ddpm_jax.checkpoint import Checkpointer, PreemptionGuard
from ddpm_jax.models.unet import UNet
from ddpm_jax.parallel import AXIS, DataParallel, compiler_options

# fold_in tags of the root key, far above any step index s of fold_in(key(seed), s).
_INIT_TAG, _GRID_TAG, _FINAL_TAG = 2_000_000_001, 2_000_000_002, 2_000_000_003
_MAX_PENDING_CALLS = 64  # fetch metrics at least this often (bounds host memory)


class ConfigError(ValueError):
    """The config, workdir or data do not allow a run; found before anything is compiled."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing after it was saved."""


@dataclasses.dataclass
class RunResult:
    """What :func:`run` did.

    Attributes:
      status: "completed", "preempted" or "already_complete".
      step: completed updates at return.
      workdir: absolute work directory.
      metrics_path: ``metrics.jsonl``.
      samples_path: ``samples.npz``, or None when not written (``sample.num_samples = 0`` or
        preempted).
      ema_params: the replicated EMA parameters at return (for sampling by the caller).
    """

    status: str
    step: int
    workdir: str
    metrics_path: str
    samples_path: str | None
    ema_params: Any = None


def build_model(config: ml_collections.ConfigDict, num_classes: int | None) -> UNet:
    """The UNet of ``config.model``, class-conditional on ``num_classes`` when requested."""
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        num_classes=num_classes if m.class_conditional else None,
        num_heads=m.num_heads,
        num_groups=m.num_groups,
        resblock_conditioning=m.resblock_conditioning,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
    )


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The noise schedule of ``config.diffusion``."""
    d = config.diffusion
    kwargs = dict(beta_start=d.beta_start, beta_end=d.beta_end) if d.schedule == "linear" else {}
    return schedules.get(d.schedule, d.num_timesteps, **kwargs)


def build_dataset(config: ml_collections.ConfigDict) -> data.ImageDataset:
    """This process's deterministic training batches; checks them against the model config."""
    d = config.data
    ds = data.make_dataset(
        d.name,
        split="train",
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        data_dir=d.data_dir,
        manual_dir=d.manual_dir,
        random_flip=d.random_flip,
        image_size=d.image_size,
        num_examples=d.num_examples,
    )
    if config.model.class_conditional and ds.num_classes is None:
        raise ValueError(f"config.model.class_conditional=True but {d.name!r} has no labels")
    h, w, _ = ds.image_shape
    factor = 2 ** (len(config.model.ch_mult) - 1)
    if h % factor or w % factor:
        raise ValueError(
            f"config.model.ch_mult={tuple(config.model.ch_mult)} needs image sides divisible by "
            f"{factor}; the images are {h}x{w} (set config.data.image_size)"
        )
    return ds


def _is_writer() -> bool:
    return jax.process_index() == 0


def _print(*args, **kwargs) -> None:
    if _is_writer():
        print(*args, **kwargs, flush=True)


def _write_json_atomic(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _format_duration(seconds: float | None) -> str:
    """``"1d 02:03:04"`` / ``"2:03:04"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    days, rest = divmod(int(seconds), 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def _cut_metrics(path: str, up_to_step: int) -> None:
    """Drops the lines of ``metrics.jsonl`` after ``up_to_step`` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        open(path, "w").close()
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= up_to_step:
                    kept.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Sampler:
    """EMA samples in rounds sharded over the mesh's batch axis, gathered on every process.

    Initial noise and per-step noise are drawn for the whole global batch of a round (the random
    draws are partitionable), so samples do not depend on the device count.
    """

    def __init__(
        self, config, model: UNet, schedule, dp: DataParallel, image_shape, decode_fn=None
    ):
        self.config, self.model, self.schedule, self.dp = config, model, schedule, dp
        self.decode_fn = decode_fn  # optional jittable map of samples to images in [-1, 1]
        self.image_shape = tuple(image_shape)
        self.sharding = NamedSharding(dp.mesh, P(AXIS))
        self._fns: dict[int, Callable] = {}

    def _fn(self, batch: int) -> Callable:
        if batch not in self._fns:
            s, shape = self.config.sample, (batch, *self.image_shape)

            def generate(ema_params, key, labels):
                k_noise, k_sample = jax.random.split(key)
                x_T = jax.random.normal(k_noise, shape)
                x_T = jax.lax.with_sharding_constraint(x_T, self.sharding)
                model_fn = lambda x_t, t, **c: self.model.apply(ema_params, x_t, t, **c)
                if self.model.num_classes is not None:
                    guided = guidance.classifier_free(
                        model_fn, s.guidance_scale, self.model.num_classes
                    )
                    model_fn = lambda x_t, t: guided(x_t, t, y=labels)
                x = samplers.sample(
                    model_fn,
                    self.schedule,
                    k_sample,
                    shape,
                    method=s.method,
                    num_steps=s.num_steps,
                    eta=s.eta if s.method == "ddim" else 0.0,
                    prediction=self.config.diffusion.prediction,
                    clip_x0=s.clip_x0 or None,
                    x_T=x_T,
                )
                return x if self.decode_fn is None else self.decode_fn(x)

            self._fns[batch] = jax.jit(
                generate,
                out_shardings=self.sharding,
                compiler_options=compiler_options(self.dp.devices),
            )
        return self._fns[batch]

    def __call__(
        self,
        ema_params,
        key: jax.Array,
        num: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``num`` samples; rounds of ``sample.batch_size`` rounded up to the device count.

        Args:
          ema_params: the (replicated) EMA parameters.
          key: sampling key; round ``r`` uses ``fold_in(key, r)``.
          num: number of samples.
          progress: optional ``progress(rounds_done, rounds)``, called after each round's
            images are on the host.

        Returns:
          ``(images uint8 [num, H, W, C], labels int32 [num])`` on every process; labels cycle
          through the classes (-1 for an unconditional model).
        """
        d = self.dp.num_devices
        batch = -(-min(self.config.sample.batch_size, num) // d) * d
        rounds = -(-num // batch)
        if self.model.num_classes is None:
            labels = np.full(rounds * batch, -1, np.int32)
        else:
            labels = (np.arange(rounds * batch) % self.model.num_classes).astype(np.int32)
        out = []
        for r in range(rounds):
            chunk = labels[r * batch : (r + 1) * batch]
            y = jax.make_array_from_callback(chunk.shape, self.sharding, lambda i, c=chunk: c[i])
            x = self._fn(batch)(ema_params, jax.random.fold_in(key, r), y)
            out.append(images.to_uint8(multihost_utils.process_allgather(x, tiled=True)))
            if progress is not None:
                progress(r + 1, rounds)
        return np.concatenate(out)[:num], labels[:num]


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    step_callback: Callable[[int], None] | None = None,
    model: Any = None,
    dataset: Any = None,
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> RunResult:
    """Trains (or resumes) the diffusion model of ``config`` in ``workdir``.

    Args:
      config: a ConfigDict built from ``ddpm_jax.config.default_config()``.
      workdir: work directory (created; resumed from when it holds checkpoints).
      step_callback: optional ``callback(step)`` called on every process after each compiled
        call with the number of completed updates (tests use it to interrupt runs).
      model: optional prebuilt Flax model replacing ``build_model(config)``; it takes the UNet's
        call ``apply(vars, x, t, y=None, train=False)`` and has ``num_classes`` (None or the null
        label), e.g. ``ddpm_jax.latent.PromptUNet``. ``config.model`` is then not used.
      dataset: optional prebuilt dataset replacing ``build_dataset(config)`` (``image_shape``,
        ``num_classes``, ``local_batch_size``, ``iterator(start_step)`` as ``data.ImageDataset``),
        e.g. ``ddpm_jax.latent.LatentDataset`` of encoded latents.
      decode_fn: optional jittable map of sampled arrays to images ``[B, H, W, C]`` in [-1, 1]
        (e.g. a frozen VAE decoder), applied before the grids and ``samples.npz``.

    Returns:
      A :class:`RunResult`.

    Raises:
      ConfigError: (a ValueError) invalid config, workdir or data, found before anything is
        compiled.
      ddpm_jax.data.DataUnavailableError: the dataset is not available.
      NonFiniteLossError: the loss or gradient norm became non-finite.
    """
    try:
        config_lib.validate(
            config, device_count=jax.device_count(), process_count=jax.process_count()
        )
        workdir = config_lib.check_workdir(workdir)
        ds = build_dataset(config) if dataset is None else dataset
        trainer = _Trainer(config, workdir, ds, model=model, decode_fn=decode_fn)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    trainer.ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints
    )
    try:
        return trainer.run(step_callback)
    finally:
        trainer.ckpt.close()


class _Trainer:
    """The pieces of one run and its loop (see :func:`run`)."""

    def __init__(self, config, workdir: str, ds: data.ImageDataset, model=None, decode_fn=None):
        self.config, self.workdir, self.ds = config, workdir, ds
        self.decode_fn = decode_fn
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.samples_path = os.path.join(workdir, "samples.npz")
        tc = config.train
        self.dp = DataParallel(config.parallel)
        self.model = build_model(config, ds.num_classes) if model is None else model
        self.lr_schedule = state_lib.learning_rate_schedule(tc.lr, tc.warmup_steps)
        self.optimizer = state_lib.make_optimizer(
            tc.lr, tc.warmup_steps, tc.grad_clip, b1=tc.b1, b2=tc.b2, eps=tc.eps
        )
        # Tracing the initialisation checks the model against the data (nothing is compiled:
        # no JAX computation runs before this point).
        self.abstract_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.dp.replicated),
            jax.eval_shape(self.init_state),
        )
        self.ckpt: Checkpointer | None = None  # opened by run()
        self.schedule: schedules.Schedule | None = None  # built by run() (device arrays)
        self.sampler: Sampler | None = None

    def key(self, tag: int) -> jax.Array:
        """``fold_in(key(seed), tag)``: the key of initialisation, grids or final samples."""
        return jax.random.fold_in(jax.random.key(self.config.seed), tag)

    def init_state(self) -> state_lib.TrainState:
        x = jnp.zeros((1, *self.ds.image_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        y = jnp.zeros((1,), jnp.int32) if self.model.num_classes is not None else None
        variables = self.model.init(self.key(_INIT_TAG), x, t, y=y)
        return state_lib.create_train_state(variables, self.optimizer)

    def run(self, step_callback) -> RunResult:
        config, tc = self.config, self.config.train
        self.schedule = build_schedule(config)
        self.sampler = Sampler(
            config, self.model, self.schedule, self.dp, self.ds.image_shape, self.decode_fn
        )
        if _is_writer():
            path, as_dict = f"{self.workdir}/config.json", json.loads(config.to_json())
            if os.path.exists(path) and _read_json(path) != as_dict:
                print(
                    f"warning: the config differs from {path}; a resumed run then differs "
                    "from an uninterrupted one",
                    file=sys.stderr,
                    flush=True,
                )
            _write_json_atomic(path, as_dict)
        state, start = self.ckpt.restore_latest(self.abstract_state)
        if state is None:
            state, start = jax.jit(self.init_state, out_shardings=self.dp.replicated)(), 0
            _print(f"new run in {self.workdir} ({self.dp.num_devices} devices, {self.dp.kind})")
        else:
            _print(f"resuming from the checkpoint of step {start} in {self.ckpt.directory}")
        if _is_writer():
            _cut_metrics(self.metrics_path, start)
        if start >= tc.num_steps:
            _print(f"training already finished (step {start} >= train.num_steps={tc.num_steps})")
            path = self._final_samples(state, overwrite=False)
            return RunResult(
                "already_complete", start, self.workdir, self.metrics_path, path, state.ema_params
            )
        status, step, state = self._loop(self.dp.from_replicated(state), start, step_callback)
        path = None
        if status == "completed":
            path = self._final_samples(self.dp.to_replicated(state), overwrite=True)
            _print(
                f"done: {step} steps. metrics: {self.metrics_path}; sample grids: "
                f"{self.workdir}/samples/; samples: {path}; checkpoints: {self.ckpt.directory}"
            )
        ema = self.dp.to_replicated(state).ema_params
        return RunResult(status, step, self.workdir, self.metrics_path, path, ema)

    def _train_fn(self):
        config, model = self.config, self.model

        def apply_fn(params, x_t, t, y=None, rng=None):
            return model.apply(params, x_t, t, y=y, train=True, rngs={"dropout": rng})

        step_fn = state_lib.make_train_step(
            apply_fn,
            self.schedule,
            self.optimizer,
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            axis_name=AXIS,
            lr_schedule=self.lr_schedule,
            prediction=config.diffusion.prediction,
            weighting=config.diffusion.weighting,
            min_snr_gamma=config.diffusion.min_snr_gamma,
            ema_decay=config.train.ema_decay,
            p_uncond=config.train.p_uncond,
            num_classes=model.num_classes,
        )
        return self.dp.wrap(step_fn)

    def _loop(self, state, start: int, step_callback):
        tc, dp, ckpt = self.config.train, self.dp, self.ckpt
        train_fn = self._train_fn()
        local_b = self.ds.local_batch_size
        index = (jax.process_index() * local_b + np.arange(local_b)).astype(np.int32)
        batches = self.ds.iterator(start)
        pending: list[tuple[int, dict]] = []  # (first step, metrics on device), not yet checked
        step, last_saved = start, start
        window = [time.time(), start]
        t_start, tty = time.time(), _is_writer() and sys.stdout.isatty()

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
                    if s % tc.log_every == 0 and _is_writer():
                        record = dict(step=s, loss=float(loss), grad_norm=float(gnorm))
                        record.update(lr=float(m["lr"][j]), steps_per_sec=sps)
                        record.update(elapsed_s=now - t_start)
                        with open(self.metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        eta = _format_duration((tc.num_steps - s) / sps if sps > 0 else None)
                        line = f"step {s}/{tc.num_steps} | loss {loss:.4f} | {sps:.2f} steps/s"
                        if tty:  # one progress line, rewritten in place
                            print(f"\r{line} | ETA {eta}", end="", flush=True)
                        else:
                            print(f"{line} | ETA {eta}", flush=True)

        def save() -> None:
            nonlocal last_saved
            flush()  # never save a state after a non-finite loss
            if last_saved != step:
                ckpt.save(step, dp.to_replicated(state))
                last_saved = step

        with PreemptionGuard() as preemption:
            while step < tc.num_steps:
                k = min(tc.steps_per_call, tc.num_steps - step)
                local = [next(batches) for _ in range(k)]
                batch = {
                    "image": np.stack([b["image"] for b in local]),
                    "label": np.stack([b["label"] for b in local]),
                    "index": np.tile(index, (k, 1)),
                }
                state, metrics = train_fn(state, dp.shard_batch(batch))
                pending.append((step, metrics))
                prev, step = step, step + k
                crossed = lambda every, a=prev, b=step: every > 0 and b // every > a // every
                if crossed(tc.log_every) or len(pending) >= _MAX_PENDING_CALLS:
                    flush()
                if step_callback is not None:
                    step_callback(step)
                if preemption.reached(step):
                    save()
                    ckpt.wait()
                    _print(
                        f"{chr(10) if tty else ''}preempted (SIGTERM): saved the checkpoint of "
                        f"step {step} in {ckpt.directory}; run the same command again to resume"
                    )
                    return "preempted", step, state
                if crossed(tc.checkpoint_every) or step == tc.num_steps:
                    save()
                if self.config.sample.grid_size > 0 and crossed(tc.sample_every):
                    self._sample_grid(state, step)
            flush()
            if tty:
                _print()
            ckpt.wait()
        return "completed", step, state

    def _sample_grid(self, state, step: int) -> None:
        g = self.config.sample.grid_size
        ema = self.dp.to_replicated(state.ema_params)
        imgs, _ = self.sampler(ema, self.key(_GRID_TAG), g * g)
        if _is_writer():
            images.save_png_grid(f"{self.workdir}/samples/step_{step:07d}.png", imgs, g)

    def _final_samples(self, state, *, overwrite: bool) -> str | None:
        """Writes ``samples.npz`` from the EMA parameters of the replicated ``state``."""
        s = self.config.sample
        if s.num_samples == 0:
            return None
        if os.path.exists(self.samples_path) and not overwrite:
            _print(f"final samples already written: {self.samples_path}")
            return self.samples_path
        _print(f"sampling {s.num_samples} images ({s.method}, {s.num_steps} steps)")
        key = self.key(_FINAL_TAG)
        imgs, labels = self.sampler(state.ema_params, key, s.num_samples)
        if _is_writer():
            tmp = self.samples_path + ".tmp.npz"
            np.savez(tmp, images=imgs, labels=labels)
            os.replace(tmp, self.samples_path)
        return self.samples_path


@dataclasses.dataclass
class LoadedRun:
    """A trained run's pieces for sampling (see :func:`load_run`).

    Attributes:
      workdir: absolute work directory.
      config: the run's config (from ``config.json``).
      model: the UNet (class-conditional when ``model.num_classes`` is set).
      schedule: the noise schedule.
      dp: data parallelism over all devices.
      image_shape: ``(H, W, C)`` of the model's images.
      ema_params: the EMA parameters of the newest checkpoint, replicated over ``dp``'s mesh.
      step: that checkpoint's step.
    """

    workdir: str
    config: ml_collections.ConfigDict
    model: UNet
    schedule: schedules.Schedule
    dp: DataParallel
    image_shape: tuple[int, int, int]
    ema_params: object
    step: int

    def sampler(self, **sample_overrides) -> Sampler:
        """A :class:`Sampler` of this run with ``config.sample.<field>`` overridden."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        for field, value in sample_overrides.items():
            if field not in config.sample:
                raise ValueError(f"sample.{field} is not a sample setting: {list(config.sample)}")
            config.sample[field] = value
        return Sampler(config, self.model, self.schedule, self.dp, self.image_shape)


def load_run(workdir: str | os.PathLike) -> LoadedRun:
    """Loads a training run's config and the EMA parameters of its newest checkpoint.

    Nothing in ``workdir`` is changed (an unreadable checkpoint is an error, not moved aside).

    Raises:
      ConfigError: (a ValueError) no such run, no ``config.json``, an invalid config or no
        checkpoint.
      ddpm_jax.data.DataUnavailableError: the run's dataset is not available (its image shape
        and classes come from it).
    """
    path = os.path.abspath(os.fspath(workdir))
    config_path = os.path.join(path, "config.json")
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise ConfigError(f"workdir={path!r} does not exist; pass a training run's --workdir")
    if not os.path.exists(config_path):
        raise ConfigError(f"workdir={path!r} has no config.json: it is not a training run")
    config = ml_collections.ConfigDict(_read_json(config_path))
    try:
        config_lib.validate(config)
        trainer = _Trainer(config, path, build_dataset(config))
    except ValueError as e:
        raise ConfigError(f"{config_path}: {e}") from e
    steps = []
    if os.path.isdir(ckpt_dir):
        steps = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())
    if not steps:
        raise ConfigError(f"workdir={path!r} has no checkpoint in {ckpt_dir}; train it first")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.train.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"workdir={path!r} has no complete checkpoint in {ckpt_dir}")
        state = ckpt.restore(step, trainer.abstract_state)
    finally:
        ckpt.close()
    return LoadedRun(
        workdir=path,
        config=config,
        model=trainer.model,
        schedule=build_schedule(config),
        dp=trainer.dp,
        image_shape=tuple(trainer.ds.image_shape),
        ema_params=state.ema_params,
        step=int(step),
    )


__all__ = [
    "ConfigError",
    "LoadedRun",
    "NonFiniteLossError",
    "RunResult",
    "Sampler",
    "build_dataset",
    "build_model",
    "build_schedule",
    "load_run",
    "run",
]
