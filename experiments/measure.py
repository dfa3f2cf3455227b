"""The benchmark's measurements of JAX programs: the matmul peak, the training step, the samplers,
the memory per parallel layout.

What is measured is exactly what ``experiments.cifar`` runs: :func:`build` turns
``experiments.cifar.get_config()``, with the benchmark's overrides (batch, compute dtype, steps
per call, and for a smaller ``model`` the UNet fields of :data:`MODELS`), into the run's pieces
through ``ddpm_jax.builders``; the training step is ``builders.build_train_step`` and sampling
goes through ``ddpm_jax.generate.Generator``. Weights are random N(0, 0.05²) from the shapes of
``jax.eval_shape`` (compiled initialisers take longer than the benchmark on CPU; throughput does
not depend on the values); the memory section compiles only, from the abstract state with each
layout's shardings. The sections (``bench_*``) take the parsed flags of
``experiments.benchmark`` and return table rows; that module describes the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import builders, config as config_lib, parallel, samplers, state as state_lib
from ddpm_jax.generate import Generator
from ddpm_jax.models.layers import DTYPES
from ddpm_jax.parallel import compiler_options
from experiments import cifar, flops

# --model: overrides of experiments.cifar's config, by section ("cifar10": Ho et al.'s UNet).
MODELS = {
    "cifar10": {},
    "small": {
        "model": dict(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=16
        )
    },
    "tiny": {
        "model": dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4),
        "data": dict(image_size=8),
    },
    "large": {"model": dict(ch=512)},  # Ho et al.'s UNet at 4x width: 571M parameters
}
MODES = ("scan", "loop")

# ------------------------------------------------------------------------- what is measured


class Setup(NamedTuple):
    """The pieces of a run of ``config``, built as ``ddpm_jax.train`` builds them."""

    config: Any
    model: Any
    image_shape: tuple[int, int, int]
    dp: Any
    schedule: Any
    optimizer: Any
    lr_schedule: Any
    abstract: Any  # the TrainState's ShapeDtypeStructs


def build(
    model: str,
    *,
    dtype: str = "float32",
    batch: int = 16,
    steps_per_call: int = 1,
    layout: str = "shard_map",
    fsdp_min_size: int | None = None,
) -> Setup:
    """``experiments.cifar.get_config()`` with the benchmark's overrides, validated and built.

    Args:
      model: a key of :data:`MODELS`.
      dtype: the UNet's compute dtype (``config.model.dtype``).
      batch: the global batch (``config.train.batch_size``), divisible by the device count.
      steps_per_call: ``config.train.steps_per_call``.
      layout: ``config.parallel``, or ``"fsdp:K"`` (``config.mesh.fsdp = K``).
      fsdp_min_size: ``config.mesh.fsdp_min_size`` (None: the config's).

    Returns:
      The :class:`Setup` of the run, over every device.

    Raises:
      UsageError: an override the config rejects (e.g. a batch the devices do not divide).
    """
    config = cifar.get_config()
    for section, fields in MODELS[model].items():
        config[section].update(fields)
    config.model.dtype = dtype
    config.train.batch_size, config.train.steps_per_call = batch, steps_per_call
    kind, _, k = layout.partition(":")
    config.parallel, config.mesh.fsdp = kind, int(k) if k else None
    if fsdp_min_size is not None:
        config.mesh.fsdp_min_size = fsdp_min_size
    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    image_shape, num_classes = builders.data_spec(config)
    net = builders.build_model(config, num_classes)
    dp = builders.build_parallel(config)
    optimizer, lr_schedule = builders.build_optimizer(config)
    abstract = builders.abstract_state(
        builders.init_state_fn(config, net, optimizer, image_shape), dp
    )
    schedule = builders.build_schedule(config)
    return Setup(config, net, image_shape, dp, schedule, optimizer, lr_schedule, abstract)


def random_params(abstract_params: Any, seed: int = 0) -> Any:
    """Host N(0, 0.05²) weights (compiled initialisers are slow on CPU).

    Args:
      abstract_params: a tree of ``jax.ShapeDtypeStruct`` (e.g. ``Setup.abstract.params``).
      seed: NumPy seed.

    Returns:
      The same tree of NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), abstract_params
    )


def train_inputs(s: Setup) -> tuple[Any, dict]:
    """The inputs of the training step of ``s``, laid out for it as the engine lays them out.

    Returns:
      ``(state, batch)``: a ``state.create_train_state`` of random weights, and this process's
      rows of ``steps_per_call`` global batches of random images, sharded once (every timed
      call reuses it).
    """
    params = s.dp.replicate_host(random_params(s.abstract.params))
    state = state_lib.create_train_state(params, s.optimizer)  # eager: replicated like params
    committed = lambda x: x if x.committed else s.dp.replicate_host(np.asarray(x))  # the counts
    state = s.dp.to_step(jax.tree.map(committed, state))
    k, b = s.config.train.steps_per_call, s.config.train.batch_size // jax.process_count()
    rng = np.random.default_rng(1)
    index = (jax.process_index() * b + np.arange(b)).astype(np.int32)
    batch = {
        "image": rng.uniform(-1, 1, (k, b, *s.image_shape)).astype(np.float32),
        "label": np.zeros((k, b), np.int32),
        "index": np.tile(index, (k, 1)),
    }
    return state, s.dp.shard_batch(batch)


# ----------------------------------------------------------------------- timing


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def num_threads() -> int:
    """CPU threads this process may use (XLA's CPU thread pool has this many)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``, not inherited across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """``jitted.lower(*args).compile()`` and the seconds it took (trace + lower + compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (blocked on) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def memory_stats(compiled) -> dict[str, float]:
    """MiB per device of one call: ``step_memory_mb`` = arguments + outputs + temporaries -
    aliased (donated) buffers, and the four terms (``memory_argument_mb``, ...)."""
    m = compiled.memory_analysis()
    m = m[0] if isinstance(m, list) and m else m
    if not m:
        return {}
    terms = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                 temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)  # fmt: skip
    peak = terms["argument"] + terms["output"] + terms["temp"] - terms["alias"]
    return dict(
        step_memory_mb=peak / 2**20, **{f"memory_{k}_mb": v / 2**20 for k, v in terms.items()}
    )


# ---------------------------------------------------------------------------------- sections


def bench_matmul(args) -> list[dict]:
    """Best FLOP/s of an ``n x n`` ``jnp.dot`` on one device per ``--dtype`` and size. A timed
    call chains enough products (dispatched back to back) to last ~20 ms."""
    rows = []
    for dtype in args.dtype:
        for n in args.matmul_sizes:
            a, b = jax.random.normal(jax.random.key(n), (2, n, n), DTYPES[dtype])
            compiled, _ = compile_timed(jax.jit(jnp.dot, compiler_options=compiler_options()), a, b)
            one = min(time_calls(lambda c=compiled, a=a, b=b: c(a, b), 1, 2))
            chain = max(1, math.ceil(0.02 / one))
            fn = lambda c=compiled, a=a, b=b, r=chain: [c(a, b) for _ in range(r)][-1]
            times = [t / chain for t in time_calls(fn, 0, args.matmul_repeats)]
            best = min(times)
            rows.append(dict(dtype=dtype, n=n, chain=chain, time_ms=1e3 * best,
                             time_ms_median=1e3 * statistics.median(times),
                             gflop_per_s=2 * n**3 / best / 1e9))  # fmt: skip
    return rows


def _timing(times: Sequence[float], per: int, batch: int, prefix: str) -> dict[str, float]:
    med = statistics.median(times) / per
    return {f"{prefix}": med, f"{prefix}_min": min(times) / per, f"{prefix}_max": max(times) / per,
            "images_per_s": batch / med}  # fmt: skip


def bench_train(args) -> list[dict]:
    """The engine's training step per ``--dtype`` and ``--steps-per-call`` (module docstring)."""
    rows = []
    for dtype in args.dtype:
        for k in args.steps_per_call:
            s = build(args.model, dtype=dtype, batch=args.batch, steps_per_call=k)
            fn = builders.build_train_step(
                s.config, s.model, s.schedule, s.optimizer, s.lr_schedule, s.dp
            )
            state, batch = train_inputs(s)
            compiled, compile_s = compile_timed(fn, state, batch)
            model_flops = 3 * flops.unet_forward_flops(s.config.model, s.image_shape, args.batch)
            impl_flops = 3 * flops.forward_flops(
                s.model, s.abstract.params, s.image_shape, args.batch
            )
            xla = flops.xla_flops(compiled)  # the scan's body once, per device: one step
            d = s.dp.num_devices
            row = dict(
                model=args.model, dtype=dtype, devices=d, batch=args.batch, steps_per_call=k,
                params_M=sum(p.size for p in jax.tree.leaves(s.abstract.params)) / 1e6,
                compile_s=compile_s, model_gflop_per_step=model_flops / 1e9,
                impl_gflop_per_step=impl_flops / 1e9,
                gflop_per_step=None if xla is None else xla * d / 1e9, **memory_stats(compiled),
            )  # fmt: skip
            if not args.compile_only:
                holder = [state]

                def call(c=compiled, h=holder, b=batch):
                    h[0], metrics = c(h[0], b)
                    return h[0], metrics

                warmup = args.train_warmup if k == 1 else max(1, args.train_warmup // 2)
                repeats = args.train_repeats if k == 1 else max(2, args.train_repeats // 2)
                row.update(_timing(time_calls(call, warmup, repeats), k, args.batch, "step_s"))
                row["steps_per_s"] = 1 / row["step_s"]
                row["model_gflop_per_s"] = row["model_gflop_per_step"] / row["step_s"]
                if xla is not None:
                    row["gflop_per_s"] = row["gflop_per_step"] / row["step_s"]
                holder.clear()  # frees the state before the next one is built
            del state
            rows.append(dict(row, process_peak_rss_mb=peak_rss_mb()))
    return rows


def bench_memory(args) -> list[dict]:
    """Per ``--dtype`` and ``--layouts``: the state's bytes per device (from the shardings of
    ``builders.abstract_state``) and the memory of the compiled training step and of the sharded
    initialisation (``memory_stats``); compile-only, nothing is allocated."""
    rows = []
    for dtype in args.dtype:
        for layout in args.layouts:
            s = build(args.model, dtype=dtype, batch=args.batch, layout=layout,
                      fsdp_min_size=args.fsdp_min_size)  # fmt: skip
            fn = builders.build_train_step(
                s.config, s.model, s.schedule, s.optimizer, s.lr_schedule, s.dp
            )
            rows_sharding = NamedSharding(s.dp.mesh, P(None, s.dp.batch_axes))
            shapes = dict(image=(*s.image_shape,), label=(), index=())
            batch = {
                k: jax.ShapeDtypeStruct((1, args.batch, *shape), np.float32 if k == "image"
                                        else np.int32, sharding=rows_sharding)
                for k, shape in shapes.items()
            }  # fmt: skip
            compiled, compile_s = compile_timed(fn, s.abstract, batch)
            init = builders.init_state_fn(s.config, s.model, s.optimizer, s.image_shape)
            shardings = jax.tree.map(lambda a: a.sharding, s.abstract)
            init_memory = memory_stats(jax.jit(init, out_shardings=shardings).lower().compile())
            state = parallel.state_bytes(s.abstract)
            rows.append(dict(
                model=args.model, dtype=dtype, layout=layout, devices=s.dp.num_devices,
                fsdp=getattr(s.dp, "fsdp", None), batch=args.batch,
                params_M=sum(p.size for p in jax.tree.leaves(s.abstract.params)) / 1e6,
                state_mb=state["per_device"] / 2**20, state_total_mb=state["total"] / 2**20,
                state_replicated_mb=state["replicated"] / 2**20, compile_s=compile_s,
                init_memory_mb=init_memory.get("step_memory_mb"), **memory_stats(compiled),
            ))  # fmt: skip
    return rows


def _loop_run(s: Setup, params, method: str, batch: int, num_steps: int, clip_x0):
    """A Python loop over a jitted ``samplers.step`` (plan, N - 1 steps, finish)."""
    shape, key = (batch, *s.image_shape), jax.random.key(0)
    jit = lambda f: jax.jit(f, compiler_options=compiler_options())
    model_fn = lambda p: lambda x, t: s.model.apply(p, x, t)
    plan_fn = jit(lambda k: samplers.plan(s.schedule, k, shape, method=method, num_steps=num_steps))
    step_fn = jit(lambda p, carry, xs_i: samplers.step(
        model_fn(p), s.schedule, carry, xs_i, method=method, clip_x0=clip_x0)[0])  # fmt: skip
    finish_fn = jit(
        lambda p, carry: samplers.finish(model_fn(p), s.schedule, carry, clip_x0=clip_x0)
    )

    def run():
        carry, xs = plan_fn(key)
        xs = jax.device_get(xs)  # per-step scalars on the host, as a Python loop holds them
        for i in range(num_steps - 1):
            carry = step_fn(params, carry, {k: v[i] for k, v in xs.items()})
        return finish_fn(params, carry)

    return run


def bench_sampling(args) -> list[dict]:
    """Sampler throughput per ``--dtype``, method and mode (see the module docstring)."""
    rows = []
    for dtype in args.dtype:
        s = build(args.model, dtype=dtype, batch=args.batch)
        params = s.dp.replicate_host(random_params(s.abstract.params))
        params_m = sum(p.size for p in jax.tree.leaves(s.abstract.params)) / 1e6
        batch = -(-args.sample_batch // s.dp.num_devices) * s.dp.num_devices
        settings = builders.sample_settings(s.config)
        settings = settings.replace(num_steps=args.num_steps, batch_size=batch)
        prediction = s.config.diffusion.prediction
        for method in args.methods:
            m = settings.replace(method=method)
            gen = Generator(s.model, s.schedule, s.dp, s.image_shape, m, prediction=prediction)
            runs = {
                "scan": lambda g=gen, p=params, n=batch: g(p, jax.random.key(0), n),
                "loop": _loop_run(s, params, method, batch, args.num_steps, settings.clip_x0),
            }
            nfe, by_mode = samplers.num_model_evals(method, args.num_steps), {}
            forward_gflop = flops.unet_forward_flops(s.config.model, s.image_shape, batch) / 1e9
            for mode in args.modes:
                start = time.perf_counter()
                jax.block_until_ready(runs[mode]())  # compiles
                first = time.perf_counter() - start
                row = _timing(time_calls(runs[mode], 0, args.repeats), 1, batch, "time_s")
                row.update(calls_per_s=nfe / row["time_s"], ms_per_call=1e3 * row["time_s"] / nfe)
                row["model_gflop_per_s"] = nfe * forward_gflop / row["time_s"]
                by_mode[mode] = dict(
                    model=args.model, dtype=dtype, devices=s.dp.num_devices, params_M=params_m,
                    method=method, mode=mode, batch=batch, num_steps=args.num_steps, nfe=nfe,
                    first_call_s=first, compile_s=max(0.0, first - row["time_s"]), **row,
                )  # fmt: skip
            if len(by_mode) == 2:
                by_mode["scan"]["scan_speedup"] = (
                    by_mode["loop"]["time_s"] / by_mode["scan"]["time_s"]
                )
            rows.extend(by_mode.values())
    return rows


__all__ = [
    "MODELS",
    "MODES",
    "Setup",
    "bench_matmul",
    "bench_memory",
    "bench_sampling",
    "bench_train",
    "build",
    "compile_timed",
    "memory_stats",
    "random_params",
    "time_calls",
    "train_inputs",
]
