"""Smoke test of experiments/benchmark.py: the tiny configuration runs every section end to end.

No timing assertions (figures depend on the machine and its load): the test checks that the
command succeeds, that the JSON carries the headline figures of the issue, that they are positive
and finite, and that the FLOP counts are consistent (XLA's cost analysis of the training step
versus 3x the convolution and matmul FLOPs of the forward pass counted from its jaxpr).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import benchmark

REPO = Path(__file__).resolve().parents[1]
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--tiny", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        return json.load(f), proc.stdout


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_benchmark_writes_the_headline_figures(tiny_run):
    result, stdout = tiny_run
    keys = [
        "train_images_per_sec",
        "sample_images_per_sec",
        "train_flops_utilization",
        "train_xla_flops_utilization",
        "matmul_peak_gflop_per_s",
        "train_gflop_per_s",
        "train_compile_s",
        "train_step_memory_mb",
    ]
    if HAS_TORCH:
        keys += [
            "torch_train_images_per_sec",
            "torch_sample_images_per_sec",
            "train_speedup",
            "sample_speedup",
        ]
    bad = {k: result.get(k) for k in keys if not _positive(result.get(k))}
    assert bad == {}, bad
    assert ("train_speedup" in result) == HAS_TORCH
    # Every sampler ran; the table and the summary were printed.
    assert set(result["sample_images_per_sec_by_method"]) == {"ddpm", "ddim", "dpmpp_2m", "heun"}
    assert all(_positive(v) for v in result["sample_images_per_sec_by_method"].values())
    for title in ("== matmul ==", "== train ==", "== sampling ==", "== summary =="):
        assert title in stdout
    meta = result["meta"]
    assert meta["args"]["model"] == "tiny" and meta["threads"] >= 1
    # Ratios are what they claim to be.
    if HAS_TORCH:
        ratio = result["train_images_per_sec"] / result["torch_train_images_per_sec"]
        assert result["train_speedup"] == pytest.approx(ratio)
    rows = result["sections"]["train"]
    assert [r["steps_per_call"] for r in rows] == [1, 2]
    for row in rows:
        peak = result["matmul_peak_gflop_per_s"]
        assert row["flops_utilization"] == pytest.approx(
            row["model_gflop_per_step"] / row["step_s"] / peak
        )
        assert row["xla_flops_utilization"] == pytest.approx(row["gflop_per_s"] / peak)
        # XLA's count of the compiled step vs 3x the nominal forward FLOPs: same order (XLA
        # skips padding taps and adds elementwise work; tiny models are elementwise-heavy).
        assert 0.3 < row["gflop_per_step"] / row["model_gflop_per_step"] < 3


def test_nominal_unet_flops_match_the_jaxpr_count():
    """The closed-form FLOP count of the architecture equals the count of the network's jaxpr,
    except for the upsampling convolutions, which the network computes with 4/9 of the
    multiply-adds (layers.upsample_conv)."""
    for name in ("tiny", "small"):
        kwargs, size = benchmark.MODELS[name]
        model = benchmark.UNet(**kwargs)
        params = benchmark.random_params(model, size)
        nominal = benchmark.unet_forward_flops(kwargs, size, 3)
        counted = benchmark.forward_flops(model, params, 3, size)
        # "small" upsamples twice, 64 channels each: to 16x16 and to 32x32.
        upsample = 0 if name == "tiny" else 2 * 3 * 9 * (16**2 + 32**2) * 64**2
        assert counted == pytest.approx(nominal - upsample * (1 - 4 / 9))


def test_jaxpr_flop_count_matches_closed_forms():
    """The cross-check of XLA's FLOP count: convolutions and dots counted from the jaxpr."""
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
    a = jax.ShapeDtypeStruct((4, 6), jnp.float32)
    b = jax.ShapeDtypeStruct((6, 7), jnp.float32)

    def f(x, w, a, b):
        y = jax.lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y, jax.jit(jnp.dot)(a, b)  # a nested call is counted too

    jaxpr = jax.make_jaxpr(f)(x, w, a, b)
    conv = 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)  # 2 x outputs x (window x input channels)
    assert benchmark.jaxpr_matmul_flops(jaxpr.jaxpr) == conv + 2 * 4 * 7 * 6
