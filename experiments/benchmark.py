"""Throughput benchmarks for ddpm_jax. Timing lives here, never in the tests.

Sections (a plain dict, :data:`SECTIONS`; each is ``section(args) -> list[dict]`` of table rows):

- ``sampling``: sampler throughput for every method on a UNet, compiled as one ``jax.lax.scan``
  (``samplers.sample`` under ``jax.jit``) versus a Python loop over a jitted
  ``samplers.step`` (one dispatch per step, as a diffusers-style loop does). Reports images/s
  and network calls/s (each call is one UNet forward pass over the whole batch).

Usage::

    python -m experiments.benchmark                    # small + CIFAR-10 UNets, a few minutes
    python -m experiments.benchmark --tiny             # smoke run, < 30 s
    python -m experiments.benchmark --models cifar10 --cifar10-batch 64 --json out.json

Weights are random (throughput does not depend on their values); the first call of each
configuration (trace + compile + run) is reported separately from the best of ``--repeats``
timed calls. ``--tiny`` also lowers XLA's code-generation effort, so its figures only show that
everything runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import samplers, schedules
from ddpm_jax.models.unet import CIFAR10_DDPM, UNet

# name -> (UNet keyword arguments, image size). "cifar10" is Ho et al.'s 35.7M-parameter model.
MODELS = {
    "tiny": (
        dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4),
        8,
    ),
    "small": (
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=16),
        32,
    ),
    "cifar10": ({**CIFAR10_DDPM, "dropout": 0.0}, 32),
}
MODES = ("scan", "loop")
# --tiny is a smoke run: compile time dominates, so ask XLA for cheap code generation.
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


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


def time_call(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Returns (first call seconds incl. compilation, best of ``repeats`` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return first, best


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


def device_info() -> dict:
    dev = jax.devices()[0]
    return dict(
        platform=dev.platform,
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
        jax_version=jax.__version__,
        python=platform.python_version(),
    )


# -------------------------------------------------------------------------------- sampling


def _model_fn_of(model, params):
    return lambda x, t: model.apply(params, x, t)


def _sampler_runners(model, params, schedule, shape, method, num_steps, finish_fn):
    """Zero-argument callables for the two modes, sharing parameters and a fixed key."""
    key = jax.random.PRNGKey(0)
    model_fn_of = functools.partial(_model_fn_of, model)

    @jax.jit
    def scan_run(p, sched, k):
        return samplers.sample(model_fn_of(p), sched, k, shape, method=method, num_steps=num_steps)

    plan_fn = jax.jit(
        lambda sched, k: samplers.plan(sched, k, shape, method=method, num_steps=num_steps)
    )
    step_fn = jax.jit(
        lambda p, sched, carry, xs_i: samplers.step(
            model_fn_of(p), sched, carry, xs_i, method=method
        )[0]
    )

    def loop_run():
        carry, xs = plan_fn(schedule, key)
        xs = jax.device_get(xs)  # per-step scalars on the host, as a Python loop holds them
        for i in range(num_steps - 1):
            carry = step_fn(params, schedule, carry, {k: v[i] for k, v in xs.items()})
        return finish_fn(params, schedule, carry)

    return {"scan": lambda: scan_run(params, schedule, key), "loop": loop_run}


def bench_sampling(args) -> list[dict]:
    """Sampler throughput per model, method and mode (see the module docstring)."""
    schedule = schedules.linear(1000)
    rows = []
    for name in args.models:
        kwargs, size = MODELS[name]
        model = UNet(**kwargs)
        params = random_params(model, size)
        n_params = sum(int(p.size) for p in jax.tree.leaves(params))
        batch = args.cifar10_batch if name == "cifar10" else args.batch
        num_steps = args.cifar10_num_steps if name == "cifar10" else args.num_steps
        shape = (batch, size, size, 3)
        finish_fn = jax.jit(  # method-independent: compiled once per model
            lambda p, sched, carry, m=model: samplers.finish(_model_fn_of(m, p), sched, carry)
        )
        for method in args.methods:
            runners = _sampler_runners(model, params, schedule, shape, method, num_steps, finish_fn)
            nfe = samplers.num_model_evals(method, num_steps)
            by_mode = {}
            for mode in args.modes:
                first, best = time_call(runners[mode], args.repeats)
                by_mode[mode] = dict(
                    model=name,
                    params_M=n_params / 1e6,
                    method=method,
                    mode=mode,
                    batch=batch,
                    num_steps=num_steps,
                    nfe=nfe,
                    first_call_s=first,
                    time_s=best,
                    images_per_s=batch / best,
                    calls_per_s=nfe / best,
                    ms_per_call=1e3 * best / nfe,
                )
            if len(by_mode) == 2:
                by_mode["scan"]["scan_speedup"] = (
                    by_mode["loop"]["time_s"] / by_mode["scan"]["time_s"]
                )
            rows.extend(by_mode.values())
    return rows


SAMPLING_COLUMNS = (
    "model", "params_M", "method", "mode", "batch", "num_steps", "nfe", "first_call_s", "time_s",
    "images_per_s", "calls_per_s", "ms_per_call", "scan_speedup",
)  # fmt: skip

# section name -> (function, table columns).
SECTIONS = {"sampling": (bench_sampling, SAMPLING_COLUMNS)}


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=_csv(tuple(SECTIONS), "--sections"), default=list(SECTIONS))
    p.add_argument("--models", type=_csv(tuple(MODELS), "--models"), default=["small", "cifar10"])
    p.add_argument(
        "--methods", type=_csv(samplers.METHODS, "--methods"), default=list(samplers.METHODS)
    )
    p.add_argument("--modes", type=_csv(MODES, "--modes"), default=list(MODES))
    p.add_argument("--batch", type=_positive_int, default=16, help="batch for tiny/small")
    p.add_argument("--num-steps", type=_positive_int, default=10, help="steps for tiny/small")
    p.add_argument("--cifar10-batch", type=_positive_int, default=4)
    p.add_argument("--cifar10-num-steps", type=_positive_int, default=3)
    p.add_argument("--repeats", type=_positive_int, default=2, help="timed calls after the first")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run (< 30 s): tiny model, batch 2, 3 steps, low XLA optimisation level",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows and metadata as JSON")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batch, args.num_steps, args.repeats = ["tiny"], 2, 3, 1
    for flag in ("num_steps", "cifar10_num_steps"):
        if getattr(args, flag) < 2:
            p.error(f"--{flag.replace('_', '-')} must be >= 2 (a grid ends at t = 0)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:  # compile fast; read when the backend starts, so only before any computation
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), *TINY_XLA_FLAGS]
        ).strip()
    info = device_info()
    print(f"devices: {info['device_count']} x {info['device_kind']} ({info['platform']}), "
          f"jax {info['jax_version']}")  # fmt: skip
    results = {}
    try:
        for name in args.sections:
            fn, columns = SECTIONS[name]
            results[name] = fn(args)
            print_table(name, results[name], columns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=dict(info, args=vars(args)), sections=results), f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
