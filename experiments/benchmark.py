"""Throughput benchmarks for ddpm_jax, side by side with PyTorch. Timing lives here, never in
the tests.

One command measures, in one process (PyTorch in a subprocess with the same thread count):

- ``matmul``: the peak FLOP/s of a large float32 matrix product on the device (best of a few
  sizes and repeats), the yardstick of the training step's utilisation.
- ``train``: the training step of ``ddpm_jax.state.make_train_step`` (diffusion loss, Adam with
  global-norm clipping, EMA) on the UNet, wrapped as the training engine wraps it
  (``ddpm_jax.parallel.DataParallel`` on one device: ``jax.jit`` of ``jax.shard_map`` of a
  ``lax.scan`` over ``--steps-per-call`` steps, the state donated). Compile time, the median of
  ``--train-repeats`` timed calls after ``--train-warmup`` calls, images/s, and FLOPs per step
  three ways: the model FLOPs (3x the forward pass's convolutions, dense layers and attention
  products in their textbook form, from the configuration alone), 3x the matmul FLOPs of the
  network's jaxpr, and XLA's cost analysis of the compiled step (fewer: the upsampling
  convolutions compute with 4/9 of the textbook multiply-adds, and XLA skips padding taps).
  ``flops_utilization`` is model FLOPs / step time / matmul peak (the usual "MFU");
  ``xla_flops_utilization`` uses XLA's count. Also the step's memory (arguments + outputs +
  temporaries - aliased buffers).
- ``sampling``: every sampler (``samplers.sample`` under ``jax.jit``: one ``lax.scan``) at
  ``--num-steps`` steps on ``--sample-batch`` images: images/s and network calls/s; with
  ``--modes scan,loop`` also a Python loop over a jitted ``samplers.step``.
- ``torch``: ``experiments/torch_baseline.py`` -- diffusers' ``UNet2DModel`` in the DDPM CIFAR-10
  configuration, the same training step in PyTorch eager and diffusers' ``DDIMPipeline`` -- and
  the ratios JAX / PyTorch. Skipped when torch or diffusers is not installed.

Usage::

    python -m experiments.benchmark --json bench.json    # CIFAR-10 UNet, batch 16, ~10 min
    python -m experiments.benchmark --methods ddim --sections matmul,train,sampling,torch
    python -m experiments.benchmark --tiny                # smoke run of every section

Every program is compiled as the engine compiles it (``ddpm_jax.parallel.compiler_options``: on CPU,
convolutions by Eigen rather than YNNPACK). Weights are random (throughput does not depend on
their values). ``--tiny`` also lowers XLA's
code-generation effort, so its figures only show that everything runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ddpm_jax import samplers, schedules
from ddpm_jax import state as state_lib
from ddpm_jax.models.unet import CIFAR10_DDPM, UNet
from ddpm_jax.parallel import DataParallel, compiler_options, make_mesh

# name -> (UNet keyword arguments, image size). "cifar10" is Ho et al.'s 35.7M-parameter model
# (dropout 0.1 in training, as in the paper; sampling never uses dropout).
MODELS = {
    "tiny": (
        dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.1),
        8,
    ),
    "small": (
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=16),
        32,
    ),
    "cifar10": (dict(CIFAR10_DDPM), 32),
}
MODES = ("scan", "loop")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtype; params stay float32
# --tiny is a smoke run: compile time dominates, so ask XLA for cheap code generation.
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- helpers


def random_params(model: UNet, image_size: int, seed: int = 0):
    """Random N(0, 0.05²) weights with the model's parameter shapes (``jax.eval_shape``; no
    compiled initialisers, which take far longer than the benchmark itself on CPU)."""
    x = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape, np.float32)), shapes
    )


def jit(fn, **kwargs):
    """``jax.jit`` with the XLA options the training engine compiles with
    (``ddpm_jax.parallel.compiler_options``: on CPU, Eigen convolutions)."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def add_xla_flags(*flags: str) -> None:
    """Appends ``flags`` to ``XLA_FLAGS`` (read when the backend starts: call before any
    computation)."""
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``: unlike ``ru_maxrss`` it does not
    carry over a parent's peak across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def num_threads() -> int:
    """CPU threads this process may use (XLA's CPU thread pool has this many)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def compile_timed(jitted, *args) -> tuple[object, float]:
    """``jitted.lower(*args).compile()`` and the seconds it took (trace + lower + compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (blocked on) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (None if absent)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def memory_bytes(compiled) -> int | None:
    """Peak bytes of one call: arguments + outputs + temporaries - donated (aliased) buffers."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def _eqn_flops(eqn) -> float:
    """2 x multiply-adds of a convolution or dot_general equation, else 0."""
    if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars[:2])
        out = eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        rhs_spec = dn.rhs_spec  # (out feature, in feature, *spatial) positions in rhs
        window = np.prod([rhs.shape[i] for i in rhs_spec[2:]])
        in_features = rhs.shape[rhs_spec[1]]
        return 2.0 * np.prod(out.shape) * window * in_features
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        out = eqn.outvars[0].aval
        return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in lhs_contract])
    return 0.0


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr) -> float:
    """FLOPs of every convolution and dot_general in a jaxpr, nested calls included (scan and
    while bodies counted once: use it on straight-line functions such as a forward pass)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += jaxpr_matmul_flops(sub)
    return total


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str], file=sys.stdout) -> None:
    """Prints ``rows`` as an aligned text table with the given columns (floats to 4 digits)."""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print(f"\n== {title} ==", file=file)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)), file=file)
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)), file=file)
    file.flush()


def _cpu_model() -> str:
    """The host CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def device_info() -> dict:
    dev = jax.devices()[0]
    info = dict(
        platform=dev.platform,
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
        threads=num_threads(),
        jax_version=jax.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compiler_options=compiler_options(),
        cpu_model=_cpu_model(),
    )
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------- matmul


def bench_matmul(args) -> list[dict]:
    """Best FLOP/s of an ``n x n`` float32 ``jnp.dot`` for each size in ``--matmul-sizes``."""
    rows = []
    rng = np.random.default_rng(0)
    for n in args.matmul_sizes:
        a = jnp.asarray(rng.standard_normal((n, n), np.float32))
        b = jnp.asarray(rng.standard_normal((n, n), np.float32))
        compiled, _ = compile_timed(jit(jnp.dot), a, b)
        times = time_calls(lambda c=compiled, a=a, b=b: c(a, b), 1, args.matmul_repeats)
        best = min(times)
        rows.append(dict(n=n, time_ms=1e3 * best, gflop_per_s=2 * n**3 / best / 1e9))
    return rows


MATMUL_COLUMNS = ("n", "time_ms", "gflop_per_s")


# ----------------------------------------------------------------------------------- train


def make_train_fn(model: UNet, size: int, batch: int, steps_per_call: int):
    """The engine's training step for ``model`` on ``size x size`` images, on one device.

    Returns:
      ``(fn, state, batch, params)``: ``fn(state, batch) -> (state, metrics)`` runs
      ``steps_per_call`` steps and donates ``state``; ``batch`` holds random images.
    """
    params = random_params(model, size)
    optimizer = state_lib.make_optimizer()  # Adam 2e-4, warm-up 5000, clip 1.0
    schedule = schedules.linear(1000)

    def apply_fn(p, x_t, t, y=None, rng=None):
        return model.apply(p, x_t, t, train=True, rngs={"dropout": rng})

    step_fn = state_lib.make_train_step(
        apply_fn, schedule, optimizer, seed=0, global_batch_size=batch, axis_name="data"
    )
    dp = DataParallel("shard_map", make_mesh(jax.devices()[:1]))
    state = dp.from_replicated(state_lib.create_train_state(params, optimizer))
    rng = np.random.default_rng(1)
    k = steps_per_call
    host_batch = {
        "image": rng.uniform(-1, 1, (k, batch, size, size, 3)).astype(np.float32),
        "label": np.zeros((k, batch), np.int32),
        "index": np.broadcast_to(np.arange(batch, dtype=np.int32), (k, batch)).copy(),
    }
    return dp.wrap(step_fn, donate=True), state, dp.shard_batch(host_batch), params


def _model(name: str, **overrides) -> tuple[UNet, int]:
    kwargs, size = MODELS[name]
    return UNet(**{**kwargs, **overrides}), size


def forward_flops(model: UNet, params, batch: int, size: int) -> float:
    """Convolution + matmul FLOPs of one forward pass, counted from its jaxpr."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply(p, x, t))(params, x, t)
    return jaxpr_matmul_flops(jaxpr.jaxpr)


def unet_forward_flops(kwargs: dict, size: int, batch: int, in_channels: int = 3) -> float:
    """Nominal FLOPs (2 x multiply-adds) of one UNet forward pass: every convolution, dense layer
    and attention product of the DDPM architecture in its textbook form (3x3 convolution of the
    upsampled image, separate q / k / v), counted from the configuration alone.

    Args:
      kwargs: UNet keyword arguments (``ch``, ``ch_mult``, ``num_res_blocks``,
        ``attn_resolutions``); no class or text conditioning.
      size: image height = width.
      batch: B.
      in_channels: image channels (output channels are the same).
    """
    ch, mult = kwargs["ch"], tuple(kwargs["ch_mult"])
    nres, attn_res = kwargs["num_res_blocks"], tuple(kwargs["attn_resolutions"])
    temb = 4 * ch

    def conv(res, cin, cout, k=3):
        return 2.0 * batch * res * res * k * k * cin * cout

    def res_block(res, cin, cout):
        f = conv(res, cin, cout) + conv(res, cout, cout) + 2.0 * batch * temb * cout
        return f + (conv(res, cin, cout, k=1) if cin != cout else 0.0)

    def attn(res, c):
        tokens = res * res
        return 4 * 2.0 * batch * tokens * c * c + 2 * 2.0 * batch * tokens * tokens * c

    total = 2.0 * batch * (ch * temb + temb * temb) + conv(size, in_channels, ch)
    skips, res, c = [ch], size, ch
    for i, m in enumerate(mult):
        for _ in range(nres):
            total += res_block(res, c, ch * m)
            c = ch * m
            total += attn(res, c) if res in attn_res else 0.0
            skips.append(c)
        if i != len(mult) - 1:
            total += conv(res // 2, c, c)  # stride 2: output resolution res / 2
            res //= 2
            skips.append(c)
    total += 2 * res_block(res, c, c) + attn(res, c)
    for i in reversed(range(len(mult))):
        for _ in range(nres + 1):
            total += res_block(res, c + skips.pop(), ch * mult[i])
            c = ch * mult[i]
            total += attn(res, c) if res in attn_res else 0.0
        if i != 0:
            res *= 2
            total += conv(res, c, c)  # after nearest-neighbour upsampling
    return total + conv(size, ch, in_channels)


def bench_train(args) -> list[dict]:
    """Training throughput of the engine's step for each ``--steps-per-call`` (see the module
    docstring)."""
    model, size = _model(args.model, dtype=DTYPES[args.dtype])
    batch = args.batch
    rows = []
    for k in args.steps_per_call:
        fn, state, data, params = make_train_fn(model, size, batch, k)
        compiled, compile_s = compile_timed(fn, state, data)
        holder = {"state": state}

        def call(compiled=compiled, holder=holder, data=data):
            holder["state"], metrics = compiled(holder["state"], data)
            return holder["state"], metrics

        warmup = args.train_warmup if k == 1 else 1
        repeats = args.train_repeats if k == 1 else max(2, args.train_repeats // 2)
        times = time_calls(call, warmup, repeats)
        del holder
        step_s = statistics.median(times) / k
        flops = xla_flops(compiled)  # counts the scan's body once: FLOPs of one step
        model_flops = 3.0 * unet_forward_flops(MODELS[args.model][0], size, batch)
        impl_flops = 3.0 * forward_flops(model, params, batch, size)
        mem = memory_bytes(compiled)
        rows.append(
            dict(
                model=args.model,
                dtype=args.dtype,
                params_M=sum(int(p.size) for p in jax.tree.leaves(params)) / 1e6,
                batch=batch,
                steps_per_call=k,
                compile_s=compile_s,
                step_s=step_s,
                step_s_min=min(times) / k,
                images_per_s=batch / step_s,
                gflop_per_step=None if flops is None else flops / 1e9,
                model_gflop_per_step=model_flops / 1e9,
                impl_gflop_per_step=impl_flops / 1e9,
                gflop_per_s=None if flops is None else flops / step_s / 1e9,
                model_gflop_per_s=model_flops / step_s / 1e9,
                step_memory_mb=None if mem is None else mem / 2**20,
                process_peak_rss_mb=peak_rss_mb(),
            )
        )
    return rows


TRAIN_COLUMNS = (
    "model", "dtype", "batch", "steps_per_call", "compile_s", "step_s", "images_per_s",
    "gflop_per_step", "model_gflop_per_step", "impl_gflop_per_step", "gflop_per_s",
    "flops_utilization", "xla_flops_utilization", "step_memory_mb", "process_peak_rss_mb",
)  # fmt: skip


# -------------------------------------------------------------------------------- sampling


def _model_fn_of(model, params):
    return lambda x, t: model.apply(params, x, t)


def _sampler_runners(model, params, schedule, shape, method, num_steps, finish_fn):
    """``{mode: (compiled-or-None, zero-argument callable)}`` for the two modes."""
    key = jax.random.PRNGKey(0)
    model_fn_of = functools.partial(_model_fn_of, model)
    kw = dict(method=method, num_steps=num_steps, clip_x0=1.0)

    def scan_run(p, sched, k):
        return samplers.sample(model_fn_of(p), sched, k, shape, **kw)

    plan_fn = jit(
        lambda sched, k: samplers.plan(sched, k, shape, method=method, num_steps=num_steps)
    )
    step_fn = jit(
        lambda p, sched, carry, xs_i: samplers.step(
            model_fn_of(p), sched, carry, xs_i, method=method, clip_x0=1.0
        )[0]
    )

    def loop_run():
        carry, xs = plan_fn(schedule, key)
        xs = jax.device_get(xs)  # per-step scalars on the host, as a Python loop holds them
        for i in range(num_steps - 1):
            carry = step_fn(params, schedule, carry, {k: v[i] for k, v in xs.items()})
        return finish_fn(params, schedule, carry)

    return {"scan": (jit(scan_run), (params, schedule, key)), "loop": (None, loop_run)}


def bench_sampling(args) -> list[dict]:
    """Sampler throughput per method and mode (see the module docstring)."""
    schedule = schedules.linear(1000)
    model, size = _model(args.model, dropout=0.0, dtype=DTYPES[args.dtype])
    params = random_params(model, size)
    n_params = sum(int(p.size) for p in jax.tree.leaves(params))
    batch, num_steps = args.sample_batch, args.num_steps
    shape = (batch, size, size, 3)
    finish_fn = jit(  # method-independent: compiled once
        lambda p, sched, carry: samplers.finish(_model_fn_of(model, p), sched, carry, clip_x0=1.0)
    )
    rows = []
    for method in args.methods:
        runners = _sampler_runners(model, params, schedule, shape, method, num_steps, finish_fn)
        nfe = samplers.num_model_evals(method, num_steps)
        by_mode = {}
        for mode in args.modes:
            jitted, run_or_args = runners[mode]
            if jitted is not None:  # AOT-compile, so that compile time is reported separately
                compiled, compile_s = compile_timed(jitted, *run_or_args)
                warmup, fn = 0, lambda c=compiled, a=run_or_args: c(*a)
            else:  # many small programs: the first (untimed) call compiles them
                start = time.perf_counter()
                jax.block_until_ready(run_or_args())
                compile_s, warmup, fn = time.perf_counter() - start, 0, run_or_args
            times = time_calls(fn, warmup, args.repeats)
            best = statistics.median(times)
            by_mode[mode] = dict(
                model=args.model,
                dtype=args.dtype,
                params_M=n_params / 1e6,
                method=method,
                mode=mode,
                batch=batch,
                num_steps=num_steps,
                nfe=nfe,
                compile_s=compile_s,
                time_s=best,
                images_per_s=batch / best,
                calls_per_s=nfe / best,
                ms_per_call=1e3 * best / nfe,
            )
        if len(by_mode) == 2:
            by_mode["scan"]["scan_speedup"] = by_mode["loop"]["time_s"] / by_mode["scan"]["time_s"]
        rows.extend(by_mode.values())
    return rows


SAMPLING_COLUMNS = (
    "model", "dtype", "method", "mode", "batch", "num_steps", "nfe", "compile_s", "time_s",
    "images_per_s", "calls_per_s", "ms_per_call", "scan_speedup",
)  # fmt: skip


# ----------------------------------------------------------------------------------- torch


def torch_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def bench_torch(args) -> list[dict]:
    """Runs ``experiments.torch_baseline`` in a subprocess with this process's thread count."""
    if not torch_available():
        print("torch / diffusers not installed: skipping the PyTorch baseline", flush=True)
        return []
    if args.model not in ("cifar10", "tiny"):
        raise ValueError(f"--model={args.model}: the PyTorch baseline has cifar10 and tiny only")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [
            sys.executable, "-m", "experiments.torch_baseline",
            "--model", args.model,
            "--threads", str(num_threads()),
            "--batch", str(args.batch),
            "--sample-batch", str(args.sample_batch),
            "--num-steps", str(args.num_steps),
            "--warmup", str(args.train_warmup),
            "--repeats", str(args.train_repeats),
            "--sample-repeats", str(args.repeats),
            "--dropout", str(MODELS[args.model][0].get("dropout", 0.0)),
            "--json", out,
        ]  # fmt: skip
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            result = json.load(f)
    train, sample = result["train"], result["sample"]
    common = dict(framework=f"torch {result['torch_version']}", threads=result["threads"])
    return [
        dict(common, what="train", batch=train["batch"], time_s=train["step_s"],
             images_per_s=train["images_per_s"], peak_rss_mb=result.get("peak_rss_mb")),
        dict(common, what=f"sample ddim-{sample['num_steps']}", batch=sample["batch"],
             time_s=sample["time_s"], images_per_s=sample["images_per_s"],
             peak_rss_mb=result.get("peak_rss_mb")),
    ]  # fmt: skip


TORCH_COLUMNS = ("framework", "threads", "what", "batch", "time_s", "images_per_s", "peak_rss_mb")

# section name -> (function, table columns), run in this order.
SECTIONS = {
    "matmul": (bench_matmul, MATMUL_COLUMNS),
    "train": (bench_train, TRAIN_COLUMNS),
    "sampling": (bench_sampling, SAMPLING_COLUMNS),
    "torch": (bench_torch, TORCH_COLUMNS),
}


def summarize(results: dict[str, list[dict]]) -> dict:
    """The headline figures (JSON keys of the issue) from the sections' rows."""
    out: dict = {}
    if results.get("matmul"):
        out["matmul_peak_gflop_per_s"] = max(r["gflop_per_s"] for r in results["matmul"])
    if results.get("train"):
        peak = out.get("matmul_peak_gflop_per_s")
        for row in results["train"]:
            if peak:  # model FLOPs (the architecture's nominal count) / time / peak
                row["flops_utilization"] = row["model_gflop_per_s"] / peak
                if row["gflop_per_s"]:  # what XLA counts in the compiled step
                    row["xla_flops_utilization"] = row["gflop_per_s"] / peak
        row = max(results["train"], key=lambda r: r["images_per_s"])  # the headline
        out["train_images_per_sec"] = row["images_per_s"]
        out["train_steps_per_call"] = row["steps_per_call"]
        out["train_images_per_sec_by_steps_per_call"] = {
            str(r["steps_per_call"]): r["images_per_s"] for r in results["train"]
        }
        out["train_step_s"] = row["step_s"]
        out["train_compile_s"] = row["compile_s"]
        out["train_gflop_per_s"] = row["gflop_per_s"]
        out["train_model_gflop_per_step"] = row["model_gflop_per_step"]
        out["train_step_memory_mb"] = row["step_memory_mb"]
        if "flops_utilization" in row:
            out["train_flops_utilization"] = row["flops_utilization"]
        if "xla_flops_utilization" in row:
            out["train_xla_flops_utilization"] = row["xla_flops_utilization"]
    scan_rows = [r for r in results.get("sampling", []) if r["mode"] == "scan"]
    if scan_rows:
        ddim = [r for r in scan_rows if r["method"] == "ddim"]
        head = (ddim or scan_rows)[0]
        out["sample_method"] = f"{head['method']}-{head['num_steps']}"
        out["sample_images_per_sec"] = head["images_per_s"]
        out["sample_images_per_sec_by_method"] = {r["method"]: r["images_per_s"] for r in scan_rows}
    torch_rows = results.get("torch", [])
    if torch_rows:
        out["torch_train_images_per_sec"] = torch_rows[0]["images_per_s"]
        out["torch_sample_images_per_sec"] = torch_rows[1]["images_per_s"]
        if "train_images_per_sec" in out:
            out["train_speedup"] = out["train_images_per_sec"] / out["torch_train_images_per_sec"]
            out["train_speedup_by_steps_per_call"] = {
                k: v / out["torch_train_images_per_sec"]
                for k, v in out["train_images_per_sec_by_steps_per_call"].items()
            }
        ddim = [r for r in scan_rows if r["method"] == "ddim"]
        if ddim:
            out["sample_speedup"] = ddim[0]["images_per_s"] / out["torch_sample_images_per_sec"]
    return out


# ------------------------------------------------------------------------------------ main


def _csv(allowed: Sequence[str], flag: str):
    def parse(text: str) -> list[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{flag}: unknown {bad or 'empty list'}; allowed: {','.join(allowed)}"
            )
        return items

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(s) for s in text.split(",") if s]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=_csv(tuple(SECTIONS), "--sections"), default=list(SECTIONS))
    p.add_argument("--model", choices=tuple(MODELS), default="cifar10")
    p.add_argument("--batch", type=_positive_int, default=16, help="training batch")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="UNet compute dtype (bfloat16 for accelerators; the PyTorch baseline is float32)",
    )
    p.add_argument(
        "--steps-per-call",
        type=_int_list,
        default=[1, 10],
        help="training steps scanned per compiled call, one measurement each (comma list)",
    )
    p.add_argument("--train-warmup", type=_positive_int, default=2, help="untimed calls")
    p.add_argument("--train-repeats", type=_positive_int, default=5, help="timed calls (median)")
    p.add_argument("--sample-batch", type=_positive_int, default=16)
    p.add_argument("--num-steps", type=_positive_int, default=50, help="sampler steps")
    p.add_argument(
        "--methods", type=_csv(samplers.METHODS, "--methods"), default=list(samplers.METHODS)
    )
    p.add_argument("--modes", type=_csv(MODES, "--modes"), default=["scan"])
    p.add_argument("--repeats", type=_positive_int, default=1, help="timed sampling calls")
    p.add_argument("--matmul-sizes", type=_int_list, default=[2048, 4096])
    p.add_argument("--matmul-repeats", type=_positive_int, default=5)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: tiny model, batch 2, 3 sampler steps, low XLA optimisation level",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures and rows as JSON")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.batch, args.sample_batch, args.num_steps = "tiny", 2, 2, 3
        args.steps_per_call = [1, 2]
        args.train_warmup, args.train_repeats, args.repeats = 1, 1, 1
        args.matmul_sizes, args.matmul_repeats = [256], 2
    if args.num_steps < 2:
        p.error("--num-steps must be >= 2 (a grid ends at t = 0)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # XLA flags are read when the backend starts, so only before any computation.
    if args.tiny:  # compile fast
        add_xla_flags(*TINY_XLA_FLAGS)
    info = device_info()
    print(
        f"devices: {info['device_count']} x {info['device_kind']} ({info['platform']}), "
        f"{info['threads']} threads ({info['cpu_model']}), jax {info['jax_version']}, "
        f"XLA_FLAGS={info['xla_flags']!r}, compiler options {info['compiler_options']}",
        flush=True,
    )
    results = {}
    try:
        for name in args.sections:
            fn, columns = SECTIONS[name]
            results[name] = fn(args)
            if name == "train":  # utilisation needs the matmul peak
                summarize(results)
            print_table(name, results[name], columns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(results)
    print("\n== summary ==")
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(info, args=vars(args), load_average_end=os.getloadavg())
            json.dump(dict(summary, meta=meta, sections=results), f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
