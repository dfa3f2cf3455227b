"""End-to-end tests of the run loop (ddpm_jax.train via ddpm_jax.cli) on a tiny digits model.

Runs are subprocesses of ``tests/_train_worker.py`` (8 simulated CPU devices unless stated) that
share a JAX compilation cache, so only the first run of each program compiles. One uninterrupted
reference run (12 steps, checkpoints every 4, every step logged) is compared with:

- a run killed with SIGKILL after step 10 and resumed: identical per-step losses and samples;
- a run stopped with SIGTERM after step 6 (pmap, 2 steps per call): a checkpoint at step 6,
  then resumed;
- a rerun whose newest checkpoint is corrupt: falls back to the previous one, identical results;
- two processes with 4 devices each (``jax.distributed`` on loopback, gloo collectives).

Bad input is checked in-process: one line on stderr, exit code 2, no compilation.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import _train_worker as worker
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ddpm_jax import cli, train
from experiments import chaos

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_worker.py")
NUM_STEPS = 12


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_compilation_cache"))


def _launch(cache_dir, workdir, *args, devices=8, wait=True):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, WORKER, f"--workdir={workdir}", *args]
    if not wait:
        pipe = subprocess.PIPE
        return subprocess.Popen(cmd, env=env, stdout=pipe, stderr=pipe, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return np.array([(m["step"], m["loss"], m["grad_norm"]) for m in _metrics(workdir)])


def _checkpoint_steps(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _params(workdir, step):
    """The parameters of a checkpoint as numpy arrays (whatever devices wrote it)."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))["params"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("runs") / "reference")
    proc = _launch(cache_dir, workdir, "--config.train.sample_every=6")
    _check_ok(proc)
    return workdir, proc


def test_uninterrupted_run_writes_every_output(reference, capsys):
    workdir, proc = reference
    assert "done: 12 steps" in proc.stdout
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["train"]["num_steps"] == NUM_STEPS and config["data"]["name"] == "digits"
    metrics = _metrics(workdir)
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
    assert _checkpoint_steps(workdir) == [4, 8, 12]

    # Re-running a finished run (in-process: nothing is compiled) only reports it.
    copy = workdir + "_rerun"
    shutil.copytree(workdir, copy)
    result = train.run(worker.tiny_config(), copy)
    assert result.status == "already_complete" and result.step == NUM_STEPS
    assert "already finished" in capsys.readouterr().out
    assert _metrics(copy) == _metrics(workdir)


def test_sigkill_between_checkpoints_then_resume_is_identical(reference, cache_dir, tmp_path):
    ref_dir, _ = reference
    workdir = str(tmp_path / "killed")
    killed = _launch(cache_dir, workdir, "--signal_at=10:SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    assert [m["step"] for m in _metrics(workdir)] == list(range(1, 11))
    assert 4 in _checkpoint_steps(workdir) and 12 not in _checkpoint_steps(workdir)
    assert not os.path.exists(os.path.join(workdir, "samples.npz"))

    resumed = _launch(cache_dir, workdir)
    _check_ok(resumed)
    assert "resuming from the checkpoint of step 8" in resumed.stdout or (
        "resuming from the checkpoint of step 4" in resumed.stdout
    )
    np.testing.assert_array_equal(_losses(workdir), _losses(ref_dir))  # bitwise
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, 12), _params(ref_dir, 12))


def test_sigterm_saves_the_current_step_and_resumes(reference, cache_dir, tmp_path):
    """With pmap and two steps per call: also shows, end to end, that these give the results of
    the shard_map reference (up to float rounding)."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "preempted")
    args = ["--config.parallel=pmap", "--config.train.steps_per_call=2"]
    stopped = _launch(cache_dir, workdir, "--signal_at=6:SIGTERM", *args)
    _check_ok(stopped)
    assert "preempted (SIGTERM): saved the checkpoint of step 6" in stopped.stdout
    assert _checkpoint_steps(workdir) == [4, 6]  # 6 is not a multiple of checkpoint_every
    assert [m["step"] for m in _metrics(workdir)] == list(range(1, 7))
    assert not os.path.exists(os.path.join(workdir, "samples.npz"))

    resumed = _launch(cache_dir, workdir, *args)
    _check_ok(resumed)
    assert "resuming from the checkpoint of step 6" in resumed.stdout
    assert _checkpoint_steps(workdir) == [4, 6, 8, 12]
    np.testing.assert_allclose(_losses(workdir), _losses(ref_dir), rtol=1e-5)


def test_corrupt_newest_checkpoint_falls_back_to_previous(reference, cache_dir, tmp_path):
    ref_dir, _ = reference
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(ref_dir, workdir)
    os.remove(os.path.join(workdir, "samples.npz"))
    data_files = glob.glob(os.path.join(workdir, "checkpoints", "12", "default", "d", "*"))
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(16)
    proc = _launch(cache_dir, workdir)
    _check_ok(proc)
    assert "warning: checkpoint 12" in proc.stderr and "resuming from step 8" in proc.stderr
    assert "resuming from the checkpoint of step 8" in proc.stdout
    assert [p.split("-")[0] for p in os.listdir(f"{workdir}/checkpoints.corrupt")] == ["12"]
    np.testing.assert_array_equal(_losses(workdir), _losses(ref_dir))
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path):
    workdir = str(tmp_path / "diverged")
    args = ["--config.train.lr=1e30", "--config.train.checkpoint_every=1"]
    proc = _launch(cache_dir, workdir, *args)
    assert proc.returncode == cli.EXIT_DIVERGED, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0], proc.stderr[-3000:]
    logged = _metrics(workdir)
    assert logged and all(np.isfinite(m["loss"]) for m in logged)
    bad_step = len(logged) + 1
    assert f"at step {bad_step}" in errors[0]
    assert _checkpoint_steps(workdir) == list(range(1, bad_step))  # nothing at or after it


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The pmap variant adds ~35 s on 2 cores (two more compilations); marked slow for that reason.
@pytest.mark.parametrize("kind", ["shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process(reference, cache_dir, tmp_path, kind):
    """2 processes x 4 devices (jax.distributed on loopback, gloo) = 1 process x 8 devices."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "two_processes")
    address = f"127.0.0.1:{_free_port()}"
    distributed = [f"--coordinator_address={address}", "--num_processes=2"]
    if kind == "pmap":  # the sampler's multi-process path is covered by the shard_map variant
        distributed.append("--config.sample.num_samples=0")
    procs = [
        _launch(
            cache_dir,
            workdir,
            *distributed,
            f"--process_id={i}",
            f"--config.parallel={kind}",
            devices=4,
            wait=False,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"{out}\n{err[-4000:]}"
    # Reduction order differs (gloo all-reduce across processes): float32 rounding only.
    np.testing.assert_allclose(_losses(workdir), _losses(ref_dir), rtol=1e-5)
    diff = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), _params(workdir, 12), _params(ref_dir, 12)
    )
    assert max(jax.tree.leaves(diff)) < 1e-5
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


# ----------------------------------------------------------------------------- never lose a run


def _digest(directory):
    """{relative path: sha256 of the content} of every file under ``directory``, and its dirs."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = None
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _cli_error(argv, capfd):
    """Runs the worker's CLI in-process; returns (exit code, stderr lines)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(worker.tiny_config, argv)
    return exit_info.value.code, capfd.readouterr().err.strip().splitlines()


def test_a_changed_model_is_refused_and_the_workdir_is_untouched(reference, tmp_path, capfd):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    before = _digest(workdir)
    code, err = _cli_error(["prog", f"--workdir={workdir}", "--config.model.ch=48"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "model.ch was 16, now 48" in err[0] and "new --workdir" in err[0]
    assert _digest(workdir) == before  # byte for byte: checkpoints, config, metrics


def test_more_steps_resume_from_the_last_step_and_the_change_is_recorded(
    reference, cache_dir, tmp_path
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "longer")
    shutil.copytree(ref_dir, workdir)
    proc = _launch(
        cache_dir, workdir, "--config.train.num_steps=16", "--config.train.sample_every=6"
    )
    _check_ok(proc)
    assert "resuming from the checkpoint of step 12" in proc.stdout
    assert "train.num_steps 12 -> 16" in proc.stdout
    assert [m["step"] for m in _metrics(workdir)] == list(range(1, 17))
    np.testing.assert_array_equal(_losses(workdir)[:12], _losses(ref_dir))
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert [(h["step"], h["changes"]) for h in history] == [(12, {"train.num_steps": [12, 16]})]
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 16
    assert _checkpoint_steps(workdir) == [4, 8, 12, 16]


# A failed tensorstore read can leave a callback for Orbax's closed event loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_is_an_error_until_the_user_starts_over(
    reference, cache_dir, tmp_path, capfd
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "damaged")
    shutil.copytree(ref_dir, workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "default", "d", "*")):
        with open(path, "r+b") as f:
            f.truncate(16)
    before = _digest(workdir)
    code, err = _cli_error(["prog", f"--workdir={workdir}"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "no checkpoint" in err[0] and "12 (" in err[0] and "4 (" in err[0]
    assert "--start_over" in err[0]
    assert _digest(workdir) == before

    proc = _launch(cache_dir, workdir, "--start_over")
    _check_ok(proc)
    assert "new run in" in proc.stdout and "moved to" in proc.stderr
    assert sorted(p.split("-")[0] for p in os.listdir(f"{workdir}/checkpoints.corrupt")) == [
        "12",
        "4",
        "8",
    ]
    assert glob.glob(f"{workdir}/metrics.jsonl.*.before-step-0")  # the old records are kept
    np.testing.assert_array_equal(_losses(workdir), _losses(ref_dir))  # the same run again


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(
    reference, cache_dir, tmp_path
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "full")
    proc = _launch(cache_dir, workdir, "--fail_writes_at=8")
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-3000:]
    assert "last complete checkpoint is step 4" in errors[0]
    assert _checkpoint_steps(workdir) == [4]
    resumed = _launch(cache_dir, workdir)  # space freed: the same command finishes the run
    _check_ok(resumed)
    assert "resuming from the checkpoint of step 4" in resumed.stdout
    np.testing.assert_array_equal(_losses(workdir), _losses(ref_dir))


def test_two_processes_agree_on_the_checkpoint_to_restore(reference, cache_dir, tmp_path):
    """Only process 1 cannot read checkpoint 12: both fall back to 8 (no hang, no split)."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "agree")
    shutil.copytree(ref_dir, workdir)
    os.remove(os.path.join(workdir, "samples.npz"))
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _launch(
            cache_dir,
            workdir,
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
            "--unreadable_on_process=1:12",
            "--config.sample.num_samples=0",
            devices=4,
            wait=False,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{out}\n{err[-4000:]}"
    assert "resuming from the checkpoint of step 8" in outs[0][0]
    assert "checkpoint 12" in outs[0][1] and "moved to" in outs[0][1]
    np.testing.assert_allclose(_losses(workdir), _losses(ref_dir), rtol=1e-5)


def test_random_kills_then_resume_give_the_uninterrupted_run_bit_for_bit(
    cache_dir, tmp_path, capsys
):
    """The chaos test: six SIGKILLs at random moments, three of them while a checkpoint is being
    written (asynchronously), the run re-run after each; metrics and the final EMA parameters
    equal an uninterrupted run's bit for bit. ``python -m experiments.chaos`` is the long
    variant on the digits recipe."""
    args = ["--config.train.num_steps=30", "--config.train.checkpoint_every=3"]
    ref_dir, workdir = str(tmp_path / "reference"), str(tmp_path / "chaos")
    _check_ok(_launch(cache_dir, ref_dir, *args))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir)
    modes = ["in_save", "random", "in_save", "random", "in_save", "random"]
    records = chaos.run_with_kills(
        [sys.executable, WORKER, *args],
        workdir,
        kills=len(modes),
        rng=np.random.default_rng(0),
        max_delay_s=8.0,
        modes=modes,
        env=env,
    )
    with capsys.disabled():
        for r in records:
            recomputed = r["last_logged_step"] - r["resumed_from"]
            print(f"\n  kill: {r} -> {recomputed} logged steps recomputed", end="")
    assert len(records) == len(modes)
    assert any(r["in_write"] for r in records)  # at least one kill inside a checkpoint write
    metrics_equal, params_equal = chaos.identical(ref_dir, workdir)
    assert metrics_equal and params_equal


def test_tensorboard_and_metrics_agree_through_a_kill_and_resume(cache_dir, tmp_path):
    """Loss at every logged step, the digits-FID at every evaluation step and the sample grids,
    read back with TensorBoard's own reader: equal to metrics.jsonl, each step once, although
    the run was killed after step 10 (evaluation at 4 and 8, grid at 6) and resumed from 8."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    workdir = str(tmp_path / "watched")
    args = ["--config.train.sample_every=6", "--config.eval.every=4"]
    args += ["--config.eval.num_samples=16", "--config.eval.num_steps=4"]
    args.append(f"--config.eval.cache_dir={tmp_path / 'reference_stats'}")
    killed = _launch(cache_dir, workdir, "--signal_at=10:SIGKILL", *args)
    assert killed.returncode == -signal.SIGKILL
    resumed = _launch(cache_dir, workdir, *args)
    _check_ok(resumed)
    assert "eval: digits_fid" in resumed.stdout and os.path.exists(f"{workdir}/report.png")
    records = _metrics(workdir)
    losses = [(r["step"], np.float32(r["loss"])) for r in records if "loss" in r]
    fids = [(r["step"], np.float32(r["eval/digits_fid"])) for r in records if "eval/seconds" in r]
    assert [s for s, _ in losses] == list(range(1, 13)) and [s for s, _ in fids] == [4, 8, 12]
    sizes = {accumulator.SCALARS: 0, accumulator.IMAGES: 0}
    acc = accumulator.EventAccumulator(f"{workdir}/tensorboard", size_guidance=sizes)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == losses
    assert [(e.step, e.value) for e in acc.Scalars("eval/digits_fid")] == fids
    assert [e.step for e in acc.Images("samples")] == [6, 12]


def test_the_digits_recipe_with_dropout_is_the_same_run_on_1_and_4_devices(cache_dir, tmp_path):
    """Dropout masks are keyed by the global example index: 10 steps of the digits recipe with
    dropout 0.1 give the same per-step losses on 1 and on 4 devices (up to the reduction order
    of the gradient mean)."""
    args = ["--config.model.dropout=0.1", "--config.train.num_steps=10"]
    args += ["--config.train.log_every=1", "--config.sample.num_samples=0"]
    args += ["--config.train.sample_every=0", "--config.eval.every=0"]
    losses = []
    for devices in (1, 4):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        workdir = str(tmp_path / f"d{devices}")
        cmd = [sys.executable, "-m", "experiments.digits", f"--workdir={workdir}", *args]
        repo = os.path.dirname(os.path.dirname(WORKER))
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        _check_ok(proc)
        assert f"({devices} devices" in proc.stdout
        losses.append(_losses(workdir))
    assert losses[0].shape == (10, 3)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
