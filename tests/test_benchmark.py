"""Smoke tests of experiments/benchmark.py: the tiny configuration runs every section end to end;
the accelerator preset on CPU compiles only; what is measured is experiments.cifar's recipe.

No timing assertions (figures depend on the machine and its load): the tests check that the
command succeeds, that the JSON carries the headline figures of the issues, that they are positive
and finite, and that the FLOP counts are consistent (XLA's cost analysis of the training step
versus 3x the textbook FLOPs of the forward pass). The FLOP counters: tests/test_flops.py.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import bench_sd15, benchmark, cifar, measure

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


@pytest.mark.slow
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


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    "model, changed",
    [
        ("cifar10", set()),
        ("tiny", {"model.ch", "model.ch_mult", "model.attn_resolutions", "model.num_res_blocks",
                  "model.num_groups", "data.image_size"}),
    ],
)  # fmt: skip
def test_the_benchmark_measures_the_cifar_recipe_with_its_overrides_only(model, changed):
    s = measure.build(model, dtype="bfloat16", batch=32, steps_per_call=3)
    ours, recipe = _flat(s.config.to_dict()), _flat(cifar.get_config().to_dict())
    differ = {k for k in ours.keys() | recipe.keys() if ours.get(k) != recipe.get(k)}
    assert differ == {"model.dtype", "train.batch_size", "train.steps_per_call"} | changed
    if model == "cifar10":  # Ho et al.'s UNet, as experiments.cifar trains it
        assert s.image_shape == (32, 32, 3)
        assert sum(p.size for p in jax.tree.leaves(s.abstract.params)) == 35_746_307


def test_presets_are_defaults_that_flags_override():
    args = benchmark.parse_args(["--preset", "accelerator", "--batch", "64"])
    assert (args.batch, args.dtype, args.steps_per_call) == (64, ["float32", "bfloat16"], [10])
    assert (args.sample_batch, args.num_steps, args.matmul_sizes) == (256, 50, [8192])
    assert benchmark.parse_args(["--tiny", "--num-steps", "4"]).num_steps == 4


@pytest.mark.slow
def test_accelerator_preset_on_cpu_compiles_and_reports_memory_only(tmp_path):
    """On CPU the preset compiles the training steps (two dtypes, all devices: two here) and
    reports their memory and compile times, and no timings."""
    out = tmp_path / "accelerator.json"
    flags = ("--xla_force_host_platform_device_count=2", *benchmark.TINY_XLA_FLAGS)  # fast compile
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    cmd = [sys.executable, "-m", "experiments.benchmark", "--preset", "accelerator"]
    cmd += ["--model", "tiny", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [line for line in proc.stdout.splitlines() if "no timings" in line]
    assert notes == [
        "the accelerator preset on a CPU: compiling the training steps only (compile times and "
        "memory), no timings"
    ]
    assert "== train ==" in proc.stdout and "== sampling ==" not in proc.stdout
    with open(out) as f:
        result = json.load(f)
    assert list(result["sections"]) == ["train"]
    rows = result["sections"]["train"]
    assert [(r["dtype"], r["devices"], r["batch"], r["steps_per_call"]) for r in rows] == [
        ("float32", 2, 128, 10),
        ("bfloat16", 2, 128, 10),
    ]
    for row in rows:
        terms = ("argument", "output", "temp", "alias")
        assert all(_positive(row[f"memory_{t}_mb"]) for t in terms), row
        peak = row["memory_argument_mb"] + row["memory_output_mb"] + row["memory_temp_mb"]
        assert row["step_memory_mb"] == pytest.approx(peak - row["memory_alias_mb"])
        assert _positive(row["compile_s"]) and _positive(row["model_gflop_per_step"])
        assert not {"step_s", "images_per_s", "steps_per_s"} & set(row)
    timings = {"train_images_per_sec", "train_step_s", "sample_images_per_sec"}
    assert not timings & set(result) and "matmul_peak_gflop_per_s" not in result
    assert _positive(result["train_step_memory_mb"]) and _positive(result["train_compile_s"])
    assert set(result["train_by_dtype"]) == {"float32", "bfloat16"}


@pytest.mark.slow
def test_memory_section_divides_the_state_over_the_fsdp_axis(tmp_path, capsys):
    """Compile-only, in this process's 8 simulated devices; one layout (each compiles)."""
    out = tmp_path / "memory.json"
    argv = ["--sections", "memory", "--model", "tiny", "--batch", "16", "--layouts", "fsdp"]
    assert benchmark.main([*argv, "--fsdp-min-size", "256", "--json", str(out)]) == 0
    with open(out) as f:
        result = json.load(f)
    (row,) = result["sections"]["memory"]
    assert (row["layout"], row["devices"], row["fsdp"]) == ("fsdp", 8, 8)
    sharded = row["state_total_mb"] - row["state_replicated_mb"]
    assert 0 < row["state_replicated_mb"] < sharded / 4  # biases and norm scales
    assert row["state_mb"] == pytest.approx(sharded / 8 + row["state_replicated_mb"])
    assert row["step_memory_mb"] > row["state_mb"]  # the state, activations, gradients
    assert row["init_memory_mb"] < 2 * row["state_mb"]  # the whole state never on one device
    assert result["memory_by_layout"]["fsdp float32"]["state"] == row["state_mb"]
    assert "== memory ==" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--layouts", "pmap"])


@pytest.mark.slow
def test_input_section_reports_preparation_reading_and_the_step(tmp_path, capsys):
    """The input section (issue #24) at a tiny size: a 16 px folder of 24 images, batches of 128
    (the recipe's), an 8-image step (one per device) of the 16 px recipe; consistent figures."""
    out = tmp_path / "input.json"
    argv = ["--sections", "input", "--input-images", "24", "--input-size", "16"]
    argv += ["--input-batches", "3", "--input-step-batch", "8", "--train-warmup", "1"]
    assert benchmark.main([*argv, "--train-repeats", "2", "--json", str(out)]) == 0
    with open(out) as f:
        result = json.load(f)
    rows = result["sections"]["input"]
    assert [(r["what"], r.get("augment")) for r in rows] == [
        ("prepare", None), ("read", "recipe"), ("read", "random"), ("step", None)
    ]  # fmt: skip
    prep, read, rand, step = rows
    assert _positive(prep["prepare_s"]) and _positive(prep["cached_start_s"])
    assert all(r["images"] == 24 and r["image_size"] == 16 for r in rows)
    for r in (read, rand):
        assert r["batch"] == 128  # the recipe's batch, not the step's
        assert r["images_per_s"] == pytest.approx(128 * r["batches_per_s"])
        assert _positive(r["batch_images_per_s"]) and _positive(r["first_batch_s"])
        assert r["read_over_step"] == pytest.approx(r["images_per_s"] / step["images_per_s"])
    assert step["batch"] == 8 and step["devices"] == jax.device_count()
    assert step["images_per_s"] == pytest.approx(8 / step["step_s"])
    assert step["step_s_min"] <= step["step_s"] <= step["step_s_max"]
    assert step["params_M"] > 0.1 and _positive(step["compile_s"])
    assert result["input_read_over_step"] == read["read_over_step"]
    assert result["input_prepare_s"] == prep["prepare_s"]
    assert "== input ==" in capsys.readouterr().out


def test_sd15_test_unet_counts_its_parameters_as_diffusers_does():
    """The test-size UNet of ``--sd-unet test`` is the diffusers config it claims to be."""
    u = bench_sd15._Unet("test")
    assert (u.latent, u.context) == ((8, 8, 4), (77, 32))
    ours = sum(x.size for x in jax.tree.leaves(jax.eval_shape(u.init)))
    if HAS_TORCH:
        from diffusers import UNet2DConditionModel

        config = {k: v for k, v in bench_sd15.UNETS["test"].items() if not k.startswith("_")}
        assert ours == sum(p.numel() for p in UNet2DConditionModel(**config).parameters())


def test_sd15_unet_is_the_860m_parameter_unet():
    """The preset's UNet: diffusers' UNet2DConditionModel of SD 1.5 has 859,520,964 parameters
    (its model card's 860M)."""
    u = bench_sd15._Unet("sd15")
    assert (u.latent, u.context) == ((64, 64, 4), (77, 768))
    assert sum(x.size for x in jax.tree.leaves(jax.eval_shape(u.init))) == 859_520_964


@pytest.mark.slow
def test_sd15_preset_compiles_the_sampling_and_training_steps(tmp_path, monkeypatch):
    """``--preset sd15`` at the test size, one layout and dtype (each compiles: ~1 min)."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main adds flags
    out = tmp_path / "sd15.json"
    argv = ["--preset", "sd15", "--sd-unet", "test", "--layouts", "fsdp", "--dtype", "float32"]
    argv += ["--sd-batch", "2", "--sd-rows", "params,sample,train,time", "--sd-time-steps", "2"]
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    with open(out) as f:
        result = json.load(f)
    params, sample, train, timed = result["sections"]["sd15"]
    count = params["params_M"] * 1e6
    assert params["params_mb_float32"] == pytest.approx(4 * count / 2**20)
    assert params["state_total_mb"] == pytest.approx(16 * count / 2**20)
    for row, what in ((sample, "sample"), (train, "train")):
        assert (row["what"], row["layout"], row["devices"], row["batch_per_device"]) == (
            what, "fsdp", 8, 2
        )  # fmt: skip
        assert "error" not in row
        terms = [row[f"memory_{t}_mb"] for t in ("argument", "output", "temp", "alias")]
        assert row["step_memory_mb"] == pytest.approx(sum(terms[:3]) - terms[3])
        assert row["state_mb"] < row["state_total_mb"] / 2  # sharded over the 8 devices
        assert row["memory_argument_mb"] >= row["state_mb"]  # the state and the batch
    assert sample["state_total_mb"] == pytest.approx(params["params_mb_float32"], rel=1e-6)
    # Params, Adam's two moments, EMA (float32) and the step counters.
    assert train["state_total_mb"] == pytest.approx(params["state_total_mb"], rel=1e-3)
    assert timed["what"] == "time" and timed["repeats"] == 2 and _positive(timed["step_s"])
    assert result["sd15_step_memory_mb"] == {
        "sample fsdp float32": sample["step_memory_mb"],
        "train fsdp float32": train["step_memory_mb"],
    }
