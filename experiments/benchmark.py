"""Throughput of exactly what ``experiments.cifar`` runs, side by side with PyTorch. Timing lives
here, never in the tests.

Everything is built from ``experiments.cifar.get_config()`` through ``ddpm_jax.builders``, as the
training engine builds it, with the benchmark's overrides: ``--batch``, ``--dtype`` (compute
dtype; parameters stay float32), ``--steps-per-call`` and, for ``--model tiny|small``, a smaller
UNet (:data:`MODELS`). Weights are random N(0, 0.05²) (throughput does not depend on their
values). One command measures, in one process (PyTorch in a subprocess, same thread count):

- ``matmul``: the peak FLOP/s of a square matrix product on one device in each ``--dtype`` (best
  of ``--matmul-repeats`` calls; JAX's default precision, as the model computes: NVIDIA GPUs may
  use TF32 for float32), the yardstick of the utilisation.
- ``train``: ``builders.build_train_step`` over every device (``parallel.DataParallel``: a
  ``lax.scan`` over ``--steps-per-call`` steps, the state donated, the batch sharded once):
  compile time, the memory of the compiled step per device (arguments + outputs + temporaries -
  aliased buffers, and the four terms), the median, min and max of the timed calls per step,
  steps/s, images/s, and FLOPs per step three ways (``experiments.flops``): model FLOPs (3x the
  textbook forward pass), 3x the network's jaxpr count and XLA's cost analysis.
  ``flops_utilization`` is model FLOPs / step time / (matmul peak of the row's dtype x devices);
  ``xla_flops_utilization`` uses XLA's count.
- ``sampling``: every sampler through ``ddpm_jax.generate.Generator`` (sharded over every device,
  as a run samples) at ``--num-steps`` steps on ``--sample-batch`` images; ``compile_s`` is the
  first call minus the median one. ``--modes scan,loop`` adds a Python loop over a jitted
  ``samplers.step`` (unsharded) and its ``scan_speedup``.
- ``memory`` (only when asked for): per ``--layouts`` (``shard_map``, ``fsdp``, ``fsdp:K`` for a
  ``K``-device fsdp axis; ``--fsdp-min-size`` overrides ``mesh.fsdp_min_size``), compile-only:
  the training state's bytes on the most loaded device (``state_mb``, from the shardings; of it
  ``state_replicated_mb`` on every device; ``state_total_mb`` the whole state) and the memory of
  the compiled step and of the sharded initialisation, as for ``train``. ``--devices N`` simulates
  ``N`` CPU devices, so a 0.5-1B UNet (``--model large``) is measured on a laptop.
- ``input`` (only when asked for): a synthetic folder prepared and read as ``experiments.folder``
  reads it, against its recipe's training step (``experiments/bench_input.py``).
- ``sd15`` (``--preset sd15``): the memory of Stable Diffusion 1.5's UNet, compile-only, per
  layout on 8 simulated devices (``experiments/bench_sd15.py``).
- ``torch``: ``experiments/torch_baseline.py`` (diffusers' ``UNet2DModel``, the same step in
  PyTorch eager, ``DDIMPipeline``; float32; run by ``experiments/bench_torch.py``) and the ratios
  JAX / PyTorch. Skipped when torch or diffusers is not installed.

Usage::

    python -m experiments.benchmark --json bench.json    # CIFAR-10 UNet, batch 16, ~10 min
    python -m experiments.benchmark --sections train,torch --steps-per-call 10
    python -m experiments.benchmark --preset accelerator --json gpu.json  # < 5 min, one H100
    python -m experiments.benchmark --tiny                # smoke run of every section
    python -m experiments.benchmark --sections memory --model large --batch 128 --devices 8 \
        --layouts shard_map,fsdp,fsdp:4                  # state and step memory per layout
    python -m experiments.benchmark --sections input     # the folder pipeline vs the 64 px step
    python -m experiments.benchmark --preset sd15        # SD 1.5 UNet memory, ~15 min on 2 cores

Presets set defaults; flags given with them win. ``--preset accelerator``: the CIFAR-10 UNet at
global batch 128 over all devices, float32 and bfloat16, 10 steps per call; every sampler at
batch 256, 50 steps; 8192² matmul peaks. On a CPU it only compiles the training steps and reports
their compile times and memory (``--compile-only``). ``--tiny`` (``--preset tiny``) also lowers
XLA's code-generation effort, so its figures only show that everything runs; ``--preset sd15``
lowers it too (it only compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

import jax

from ddpm_jax import samplers
from ddpm_jax.errors import UsageError
from ddpm_jax.models.layers import DTYPES
from ddpm_jax.parallel import compiler_options
from experiments import bench_input, bench_sd15, measure
from experiments.bench_torch import bench_torch
from experiments.measure import num_threads

PRESETS = {
    "tiny": dict(model="tiny", batch=2, sample_batch=2, num_steps=3, steps_per_call=[1, 2],
                 train_warmup=1, train_repeats=1, repeats=1, matmul_sizes=[256], matmul_repeats=2),
    "accelerator": dict(model="cifar10", batch=128, dtype=["float32", "bfloat16"],
                        steps_per_call=[10], train_warmup=4, train_repeats=20,
                        sections=["matmul", "train", "sampling"], sample_batch=256, num_steps=50,
                        repeats=3, matmul_sizes=[8192], matmul_repeats=10),
    "sd15": dict(sections=["sd15"], devices=8, dtype=["float32", "bfloat16"]),
}  # fmt: skip
# --tiny is a smoke run: compile time dominates, so ask XLA for cheap code generation.
TINY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


# --------------------------------------------------------------------------------- machine


def add_xla_flags(*flags: str) -> None:
    """Appends ``flags`` to ``XLA_FLAGS`` (read when the backend starts)."""
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def device_info() -> dict:
    """The devices, threads, versions and flags of this run."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    dev = jax.devices()[0]
    return dict(
        platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count(),
        process_count=jax.process_count(), threads=num_threads(), jax_version=jax.__version__,
        python=platform.python_version(), machine=platform.machine(), cpu_model=cpu,
        xla_flags=os.environ.get("XLA_FLAGS", ""), compiler_options=compiler_options(),
        load_average=os.getloadavg(),
    )  # fmt: skip


def _fmt(value) -> str:
    """Floats to 4 significant digits, also inside dicts; None as ''."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Prints ``rows`` as an aligned text table with the given columns."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print(f"\n== {title} ==")
    for r in [list(columns), *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


# section name -> (function, table columns), run in this order.
SECTIONS = {
    "matmul": (measure.bench_matmul,
               ("dtype", "n", "chain", "time_ms", "time_ms_median", "gflop_per_s")),
    "train": (measure.bench_train, (
        "model", "dtype", "devices", "batch", "steps_per_call", "compile_s", "step_s", "step_s_min",
        "step_s_max", "steps_per_s", "images_per_s", "gflop_per_step", "model_gflop_per_step",
        "impl_gflop_per_step", "gflop_per_s", "flops_utilization", "xla_flops_utilization",
        "step_memory_mb", "memory_temp_mb", "process_peak_rss_mb")),
    "sampling": (measure.bench_sampling, (
        "model", "dtype", "method", "mode", "batch", "num_steps", "nfe", "compile_s", "time_s",
        "time_s_min", "time_s_max", "images_per_s", "calls_per_s", "ms_per_call",
        "flops_utilization", "scan_speedup")),
    "torch": (bench_torch,
              ("framework", "threads", "what", "batch", "time_s", "images_per_s", "peak_rss_mb")),
    "memory": (measure.bench_memory, (
        "model", "dtype", "layout", "devices", "batch", "params_M", "state_mb",
        "state_replicated_mb", "state_total_mb", "step_memory_mb", "memory_temp_mb",
        "init_memory_mb", "compile_s")),
    "input": (bench_input.bench_input, bench_input.COLUMNS),
    "sd15": (bench_sd15.bench_sd15, bench_sd15.COLUMNS),
}  # fmt: skip
DEFAULT_SECTIONS = ["matmul", "train", "sampling", "torch"]  # "memory", "input", "sd15": asked for
# summary key -> train row key: of the headline row, and per dtype in "train_by_dtype".
TRAIN_FIGURES = {
    "train_images_per_sec": "images_per_s", "train_steps_per_sec": "steps_per_s",
    "train_step_s": "step_s", "train_steps_per_call": "steps_per_call", "train_dtype": "dtype",
    "train_devices": "devices", "train_compile_s": "compile_s", "train_gflop_per_s": "gflop_per_s",
    "train_model_gflop_per_step": "model_gflop_per_step", "train_step_memory_mb": "step_memory_mb",
    "train_flops_utilization": "flops_utilization",
    "train_xla_flops_utilization": "xla_flops_utilization",
}  # fmt: skip


def summarize(results: dict[str, list[dict]]) -> dict:
    """The headline figures from the sections' rows (adds the utilisations to the train rows)."""
    out: dict = {}
    peaks: dict[str, float] = {}
    for r in results.get("matmul", []):
        peaks[r["dtype"]] = max(peaks.get(r["dtype"], 0.0), r["gflop_per_s"])
    if peaks:
        out["matmul_peak_gflop_per_s"] = peaks.get("float32", max(peaks.values()))
        out["matmul_peak_gflop_per_s_by_dtype"] = peaks
    train = results.get("train", [])
    for row in train + results.get("sampling", []):
        peak = peaks.get(row["dtype"], 0.0) * row["devices"]
        if peak and "model_gflop_per_s" in row:  # model FLOPs (nominal) / time / peak
            row["flops_utilization"] = row["model_gflop_per_s"] / peak
            if row.get("gflop_per_s"):  # XLA's count
                row["xla_flops_utilization"] = row["gflop_per_s"] / peak
    if train:
        best = lambda rows: max(rows, key=lambda r: r.get("images_per_s", 0.0))
        head = best(train)  # the headline: the fastest (the first when compiled only)
        figures = lambda r: {k: r[v] for k, v in TRAIN_FIGURES.items() if r.get(v) is not None}
        out.update(figures(head))
        if "images_per_s" in head:
            out["train_images_per_sec_by_steps_per_call"] = {
                str(r["steps_per_call"]): r["images_per_s"]
                for r in train
                if r["dtype"] == head["dtype"]
            }
        dtypes = dict.fromkeys(r["dtype"] for r in train)
        out["train_by_dtype"] = {
            d: {
                k[len("train_") :]: v
                for k, v in figures(best([r for r in train if r["dtype"] == d])).items()
            }
            for d in dtypes
        }
    scan = [r for r in results.get("sampling", []) if r["mode"] == "scan"]
    if scan:
        by_dtype: dict[str, dict[str, float]] = {}
        for r in scan:
            by_dtype.setdefault(r["dtype"], {})[r["method"]] = r["images_per_s"]
        first = [r for r in scan if r["dtype"] == scan[0]["dtype"]]
        head = ([r for r in first if r["method"] == "ddim"] or first)[0]
        out["sample_method"] = f"{head['method']}-{head['num_steps']}"
        out["sample_images_per_sec"] = head["images_per_s"]
        out["sample_images_per_sec_by_method"] = by_dtype[head["dtype"]]
        out["sample_images_per_sec_by_dtype"] = by_dtype
    if results.get("memory"):  # MiB per device
        out["memory_by_layout"] = {
            f"{r['layout']} {r['dtype']}": dict(state=r["state_mb"], step=r.get("step_memory_mb"))
            for r in results["memory"]
        }
    if results.get("input"):
        out.update(bench_input.summary(results["input"]))
    if results.get("sd15"):
        out.update(bench_sd15.summary(results["sd15"]))
    torch_rows = results.get("torch", [])
    if torch_rows:
        out["torch_train_images_per_sec"] = torch_rows[0]["images_per_s"]
        out["torch_sample_images_per_sec"] = torch_rows[1]["images_per_s"]
        if "train_images_per_sec" in out:
            torch_ips = out["torch_train_images_per_sec"]
            out["train_speedup"] = out["train_images_per_sec"] / torch_ips
            out["train_speedup_by_steps_per_call"] = {
                k: v / torch_ips for k, v in out["train_images_per_sec_by_steps_per_call"].items()
            }
        if scan and "ddim" in out["sample_images_per_sec_by_method"]:
            ddim = out["sample_images_per_sec_by_method"]["ddim"]
            out["sample_speedup"] = ddim / out["torch_sample_images_per_sec"]
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


def _layouts(text: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    ok = lambda s: s in ("shard_map", "fsdp") or (s[:5] == "fsdp:" and s[5:].isdigit())
    if not items or not all(map(ok, items)):
        raise argparse.ArgumentTypeError(f"--layouts={text}: expected shard_map, fsdp, fsdp:K")
    return items


def _int_list(text: str) -> list[int]:
    return [measure.positive_int(s) for s in text.split(",") if s]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags; a preset's values are defaults that the flags given override."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), help="a preset run (module docstring)")
    p.add_argument(
        "--tiny",
        dest="preset",
        action="store_const",
        const="tiny",
        help="= --preset tiny: smoke run (tiny model, batch 2, 3 sampler steps)",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the training steps: compile times and memory, no timings",
    )
    p.add_argument("--sections", type=_csv(tuple(SECTIONS), "--sections"), default=DEFAULT_SECTIONS)
    p.add_argument("--model", choices=tuple(measure.MODELS), default="cifar10")
    p.add_argument("--batch", type=measure.positive_int, default=16, help="global training batch")
    p.add_argument(
        "--dtype",
        type=_csv(tuple(DTYPES), "--dtype"),
        default=["float32"],
        help="UNet compute dtypes, comma list (the PyTorch baseline is float32)",
    )
    p.add_argument(
        "--steps-per-call",
        type=_int_list,
        default=[1, 10],
        help="training steps scanned per compiled call, one measurement each",
    )
    p.add_argument(
        "--train-warmup",
        type=measure.positive_int,
        default=2,
        help="untimed calls (half as many, at least 1, with several steps per call)",
    )
    p.add_argument(
        "--train-repeats",
        type=measure.positive_int,
        default=5,
        help="timed calls (half as many, at least 2, with several steps per call)",
    )
    p.add_argument("--sample-batch", type=measure.positive_int, default=16)
    p.add_argument("--num-steps", type=measure.positive_int, default=50, help="sampler steps")
    p.add_argument(
        "--methods", type=_csv(samplers.METHODS, "--methods"), default=list(samplers.METHODS)
    )
    p.add_argument("--modes", type=_csv(measure.MODES, "--modes"), default=["scan"])
    p.add_argument("--repeats", type=measure.positive_int, default=1, help="timed sampling calls")
    p.add_argument("--matmul-sizes", type=_int_list, default=[2048, 4096])
    p.add_argument("--matmul-repeats", type=measure.positive_int, default=5)
    p.add_argument("--layouts", type=_layouts, default=["shard_map", "fsdp"], help="memory")
    p.add_argument("--fsdp-min-size", type=int, help="memory: config.mesh.fsdp_min_size")
    p.add_argument("--devices", type=measure.positive_int, help="simulated CPU devices (CPU only)")
    bench_input.add_arguments(p)
    bench_sd15.add_arguments(p)
    p.add_argument("--json", metavar="PATH", help="also write the figures and rows as JSON")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.num_steps < 2:
        p.error("--num-steps must be >= 2 (a grid ends at t = 0)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args, start = parse_args(argv), time.perf_counter()
    if args.preset in ("tiny", "sd15"):  # XLA reads its flags when the backend starts: first
        add_xla_flags(*TINY_XLA_FLAGS)
    if args.devices:
        add_xla_flags(f"--xla_force_host_platform_device_count={args.devices}")
    info = device_info()
    print(
        f"devices: {info['device_count']} x {info['device_kind']} ({info['platform']}), "
        f"{info['threads']} threads ({info['cpu_model']}), jax {info['jax_version']}, "
        f"XLA_FLAGS={info['xla_flags']!r}, compiler options {info['compiler_options']}",
        flush=True,
    )
    if args.preset == "accelerator" and info["platform"] == "cpu":
        args.compile_only = True
    if args.compile_only:
        args.sections = ["train"]
        why = (
            "the accelerator preset on a CPU" if args.preset == "accelerator" else "--compile-only"
        )
        print(f"{why}: compiling the training steps only (compile times and memory), no timings")
    results = {}
    try:
        for name in args.sections:
            fn, columns = SECTIONS[name]
            results[name] = fn(args)
            summarize(results)  # the train rows' utilisation needs the matmul peak
            print_table(name, results[name], columns)
    except UsageError as e:  # an invalid override: the sections measured so far are kept
        report(args, info, results, start, failed=f"{name}: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # a bug: keep what was measured, then its traceback
        report(args, info, results, start, failed=f"{name}: {type(e).__name__}: {e}")
        raise
    report(args, info, results, start)
    return 0


def report(args, info: dict, results: dict, start: float, failed: str | None = None) -> None:
    """Prints the summary of the sections in ``results`` and writes them to ``--json`` (with
    ``failed``: the section that failed and why, when one did)."""
    summary = summarize(results)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # the runtime's peak on device 0 (accelerators)
        summary["device_peak_memory_mb"] = stats["peak_bytes_in_use"] / 2**20
    summary["elapsed_s"] = time.perf_counter() - start
    print("\n== summary ==")
    for key, value in summary.items():
        print(f"{key}: {_fmt(value)}")
    if failed:
        summary["failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            meta = dict(info, args=vars(args), load_average_end=os.getloadavg())
            json.dump(dict(summary, meta=meta, sections=results), f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
