"""End-to-end tests of the run loop (ddpm_jax.train via ddpm_jax.cli) on a tiny digits model.

Runs are subprocesses of ``tests/_train_worker.py`` (8 simulated CPU devices unless stated) that
share the session's JAX compilation cache, so only the first run of each program compiles. The
uninterrupted reference run of conftest.py (12 steps, checkpoints every 4, every step logged) is
checked, and compared with two processes
with 4 devices each (``jax.distributed`` on loopback). Also: a non-finite loss, TensorBoard
records through a kill, and the digits recipe with dropout on 1 and 4 devices. Resuming after
faults is in ``test_resume.py``.

Bad input is checked in-process: one line on stderr, exit code 2, no compilation.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import _train_worker as worker
import _worker_runs as wr
import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import cli, train

NUM_STEPS = 12


def test_uninterrupted_run_writes_every_output(reference, capsys):
    workdir, stdout = reference
    assert "done: 12 steps" in stdout
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["num_steps"] == NUM_STEPS and config["data"]["name"] == "digits"
    metrics = wr.metrics(workdir)
    assert [m["step"] for m in metrics] == list(range(1, NUM_STEPS + 1))
    assert {"step", "loss", "steps_per_sec", "grad_norm", "lr"} <= set(metrics[0])
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-4:]) < losses[0]  # it learns
    assert metrics[0]["lr"] == pytest.approx(0.5e-3) and metrics[5]["lr"] == pytest.approx(1e-3)
    for step in (6, 12):  # 4x4 grid of 8x8 images enlarged 8x (>= 256 px), 1-pixel separators
        png = Image.open(os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        assert png.size == (4 * 65 + 1, 4 * 65 + 1)
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (16, 8, 8, 1)
        np.testing.assert_array_equal(f["labels"], np.arange(16) % 10)  # classes cycled
        assert f["images"].std() > 0
    assert wr.checkpoint_steps(workdir) == [4, 8, 12]

    # Re-running a finished run (in-process: nothing is compiled) only reports it.
    copy = workdir + "_rerun"
    shutil.copytree(workdir, copy)
    result = train.run(worker.tiny_config(), copy)
    assert result.status == "already_complete" and result.step == NUM_STEPS
    assert "already finished" in capsys.readouterr().out
    assert wr.metrics(copy) == wr.metrics(workdir)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path):
    workdir = str(tmp_path / "diverged")
    args = ["--config.train.lr=1e30", "--config.train.checkpoint_every=1"]
    proc = wr.launch(cache_dir, workdir, *args)
    assert proc.returncode == cli.EXIT_DIVERGED, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0], proc.stderr[-3000:]
    logged = wr.metrics(workdir)
    assert logged and all(np.isfinite(m["loss"]) for m in logged)
    bad_step = len(logged) + 1
    assert f"at step {bad_step}" in errors[0]
    assert wr.checkpoint_steps(workdir) == list(range(1, bad_step))  # nothing at or after it


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_two_processes_equal_one_process(reference, cache_dir, tmp_path, kind):
    """2 processes x 4 devices (jax.distributed on loopback, gloo) = 1 process x 8 devices."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "two_processes")
    args = [f"--config.parallel={kind}"]
    if kind == "pmap":  # the sampler's multi-process path is covered by the shard_map variant
        args.append("--config.sample.num_samples=0")
    wr.run_processes(cache_dir, workdir, *args)
    # Reduction order differs (gloo all-reduce across processes): float32 rounding only.
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-5)
    assert wr.max_diff(wr.params(workdir, 12), wr.params(ref_dir, 12)) < 1e-5
    if kind == "pmap":
        return
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert np.mean(np.abs(a["images"].astype(int) - b["images"].astype(int)) <= 1) > 0.99


class _CompileCounter:
    """Records XLA compilations (tracing is allowed: it is how the model's config is checked)."""

    def __init__(self):
        self.events, self.names = [], []

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.events.append(event)
            self.names.append(kwargs.get("fun_name"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.train.batch_size=12"], "train.batch_size=12"),
        (["--config.parallel=vmap"], "parallel='vmap'"),
        (["--config.sample.method=euler"], "sample.method='euler'"),
        (["--config.train.bacth_size=16"], "bacth_size"),
        (["--config.model.ch_mult=(1,2,2,2,2)"], "divisible by 16"),
        (["--config.model.num_heads=3"], "num_heads"),
        (["--config.data.name=no_such_dataset"], "no_such_dataset"),
        (["--config.eval.every=5", "--config.eval.inception_path=/no/such.pth"], "inception_path"),
        (["--config.data.manual_dir=/no/such/dir"], "data.manual_dir='/no/such/dir'"),
        ([], "workdir is missing"),
        (["--workdir={file}/run"], "is not a directory"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2_before_compiling(tmp_path, capfd, args, expected):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["prog", *(a.format(file=blocker) for a in args)]
    if not any(a.startswith("--workdir") for a in argv) and expected != "workdir is missing":
        argv.append(f"--workdir={tmp_path / 'run'}")
    counter = _CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(worker.tiny_config, argv)
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    err = capfd.readouterr().err
    assert exit_info.value.code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert expected in err
    assert counter.events == [], counter.names


@pytest.mark.slow
def test_tensorboard_and_metrics_agree_through_a_kill_and_resume(cache_dir, tmp_path):
    """Loss at every logged step, the digits-FID at every evaluation step and the sample grids,
    read back with TensorBoard's own reader: equal to metrics.jsonl, each step once, although
    the run was killed after step 10 (evaluation at 4 and 8, grid at 6) and resumed from 8."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    workdir = str(tmp_path / "watched")
    args = ["--config.train.sample_every=6", "--config.eval.every=4"]
    args += ["--config.eval.num_samples=16", "--config.eval.num_steps=4"]
    args.append(f"--config.eval.cache_dir={tmp_path / 'reference_stats'}")
    killed = wr.launch(cache_dir, workdir, "--signal_at=10:SIGKILL", *args)
    assert killed.returncode == -signal.SIGKILL
    resumed = wr.launch(cache_dir, workdir, *args)
    wr.check_ok(resumed)
    assert "eval: digits_fid" in resumed.stdout and os.path.exists(f"{workdir}/report.png")
    records = wr.metrics(workdir)
    losses = [(r["step"], np.float32(r["loss"])) for r in records if "loss" in r]
    fids = [(r["step"], np.float32(r["eval/digits_fid"])) for r in records if "eval/seconds" in r]
    assert [s for s, _ in losses] == list(range(1, 13)) and [s for s, _ in fids] == [4, 8, 12]
    sizes = {accumulator.SCALARS: 0, accumulator.IMAGES: 0}
    acc = accumulator.EventAccumulator(f"{workdir}/tensorboard", size_guidance=sizes)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == losses
    assert [(e.step, e.value) for e in acc.Scalars("eval/digits_fid")] == fids
    assert [e.step for e in acc.Images("samples")] == [6, 12]


@pytest.mark.slow
def test_the_digits_recipe_with_dropout_is_the_same_run_on_1_and_4_devices(cache_dir, tmp_path):
    """Dropout masks are keyed by the global example index: 10 steps of the digits recipe with
    dropout 0.1 give the same per-step losses on 1 and on 4 devices (up to the reduction order
    of the gradient mean)."""
    args = ["--config.model.dropout=0.1", "--config.train.num_steps=10"]
    args += ["--config.train.log_every=1", "--config.sample.num_samples=0"]
    args += ["--config.train.sample_every=0", "--config.eval.every=0"]
    losses = []
    for devices in (1, 4):
        env = wr.env(cache_dir, devices)
        workdir = str(tmp_path / f"d{devices}")
        cmd = [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *args]
        repo = os.path.dirname(os.path.dirname(wr.WORKER))
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        wr.check_ok(proc)
        assert f"({devices} devices" in proc.stdout
        losses.append(wr.losses(workdir))
    assert losses[0].shape == (10, 3)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_a_bug_in_get_config_keeps_its_traceback(tmp_path):
    def get_config():
        return worker.tiny_config().train.no_such_field  # an experiment's bug, not a user's

    with pytest.raises(AttributeError, match="no_such_field"):
        cli.main(get_config, ["prog", f"--workdir={tmp_path}"])
