"""Never lose a run: resuming after SIGKILL, SIGTERM, damaged checkpoints, a full disk, an edited
config and processes that disagree, end to end on the tiny digits model of ``_train_worker.py``.

Runs are subprocesses (8 simulated CPU devices unless stated) that share the session's JAX
compilation cache. The uninterrupted reference run of conftest.py (12 steps, checkpoints every 4,
every step logged) is compared with:

- five SIGKILLs at random moments, some inside checkpoint writes, the run re-run after each (the
  chaos test, against its own 30-step reference): metrics, parameters and samples bit for bit;
- a run stopped with SIGTERM after step 6 (pmap, 2 steps per call): a checkpoint at step 6,
  then resumed;
- a rerun whose newest checkpoint is corrupt, or none readable: falls back, or refuses until
  ``--start_over``;
- a changed model (refused, nothing touched), more steps (resumed and recorded);
- a disk (a tmpfs) that fills up while a checkpoint is written;
- a permission error or a device out-of-memory error while restoring: a stop, nothing moved;
- two processes of which only one finds the newest checkpoint damaged: both fall back.
"""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys

import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import cli
from experiments import chaos


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes(reference, cache_dir, tmp_path):
    """With pmap and two steps per call: also shows, end to end, that these give the results of
    the shard_map reference (up to float rounding)."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "preempted")
    args = ["--config.parallel=pmap", "--config.train.steps_per_call=2"]
    stopped = wr.launch(cache_dir, workdir, "--signal_at=6:SIGTERM", *args)
    wr.check_ok(stopped)
    assert "preempted (SIGTERM): saved the checkpoint of step 6" in stopped.stdout
    assert wr.checkpoint_steps(workdir) == [4, 6]  # 6 is not a multiple of checkpoint_every
    assert [m["step"] for m in wr.metrics(workdir)] == list(range(1, 7))
    assert not os.path.exists(os.path.join(workdir, "samples.npz"))

    resumed = wr.launch(cache_dir, workdir, *args)
    wr.check_ok(resumed)
    assert "resuming from the checkpoint of step 6" in resumed.stdout
    assert wr.checkpoint_steps(workdir) == [4, 6, 8, 12]
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-5)


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
    proc = wr.launch(cache_dir, workdir)
    wr.check_ok(proc)
    assert "warning: checkpoint 12" in proc.stderr and "resuming from step 8" in proc.stderr
    assert "resuming from the checkpoint of step 8" in proc.stdout
    assert [p.split("-")[0] for p in os.listdir(f"{workdir}/checkpoints.corrupt")] == ["12"]
    np.testing.assert_array_equal(wr.losses(workdir), wr.losses(ref_dir))
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])


def test_a_changed_model_is_refused_and_the_workdir_is_untouched(reference, tmp_path, capfd):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    before = wr.digest(workdir)
    code, err = wr.cli_error(["prog", f"--workdir={workdir}", "--config.model.ch=48"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "model.ch was 16, now 48" in err[0] and "new --workdir" in err[0]
    assert wr.digest(workdir) == before  # byte for byte: checkpoints, config, metrics


@pytest.mark.slow
def test_more_steps_resume_from_the_last_step_and_the_change_is_recorded(
    reference, cache_dir, tmp_path
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "longer")
    shutil.copytree(ref_dir, workdir)
    proc = wr.launch(
        cache_dir, workdir, "--config.train.num_steps=16", "--config.train.sample_every=6"
    )
    wr.check_ok(proc)
    assert "resuming from the checkpoint of step 12" in proc.stdout
    assert "train.num_steps 12 -> 16" in proc.stdout
    assert [m["step"] for m in wr.metrics(workdir)] == list(range(1, 17))
    np.testing.assert_array_equal(wr.losses(workdir)[:12], wr.losses(ref_dir))
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert [(h["step"], h["changes"]) for h in history] == [(12, {"train.num_steps": [12, 16]})]
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 16
    assert wr.checkpoint_steps(workdir) == [4, 8, 12, 16]


# A failed tensorstore read can leave a callback for Orbax's closed event loop (harmless).
@pytest.mark.slow
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
    before = wr.digest(workdir)
    code, err = wr.cli_error(["prog", f"--workdir={workdir}"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "no checkpoint" in err[0] and "12 (" in err[0] and "4 (" in err[0]
    assert "--start_over" in err[0]
    assert wr.digest(workdir) == before

    proc = wr.launch(cache_dir, workdir, "--start_over")
    wr.check_ok(proc)
    assert "new run in" in proc.stdout and "moved to" in proc.stderr
    assert sorted(p.split("-")[0] for p in os.listdir(f"{workdir}/checkpoints.corrupt")) == [
        "12",
        "4",
        "8",
    ]
    assert glob.glob(f"{workdir}/metrics.jsonl.*.before-step-0")  # the old records are kept
    np.testing.assert_array_equal(wr.losses(workdir), wr.losses(ref_dir))  # the same run again


@contextlib.contextmanager
def _tmpfs(path, size):
    """A tmpfs of ``size`` mounted on ``path`` (created), unmounted at exit; skips the test
    where mounting is not allowed (it needs root, as on CI)."""
    os.makedirs(path)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk (needs root): {mount.stderr}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", path], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(
    reference, cache_dir, tmp_path
):
    """A real full disk: checkpoints/ is an 8 MB tmpfs (a checkpoint takes about 1 MB) that a
    ballast file fills before checkpoint 8 is saved, so that Orbax's background write fails
    with ENOSPC (Orbax reports it as a tensorstore error); freeing space, the same command
    resumes from 4."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "full")
    ballast = os.path.join(workdir, "checkpoints", "ballast")
    with _tmpfs(os.path.join(workdir, "checkpoints"), "8m"):
        proc = wr.launch(cache_dir, workdir, f"--fill_disk_at=8:{ballast}")
        assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert f"cannot write in {workdir}: No space left on device" in errors[0]
        assert "the last complete checkpoint is step 4" in errors[0]
        assert wr.checkpoint_steps(workdir) == [4]
        os.remove(ballast)  # space freed: the same command finishes the run
        resumed = wr.launch(cache_dir, workdir)
        wr.check_ok(resumed)
        assert "resuming from the checkpoint of step 4" in resumed.stdout
        assert wr.checkpoint_steps(workdir) == [4, 8, 12]
        np.testing.assert_array_equal(wr.losses(workdir), wr.losses(ref_dir))


@pytest.mark.parametrize("fault", ["permission", "oom"])
def test_a_fault_while_restoring_stops_with_one_line_and_moves_nothing(
    reference, cache_dir, tmp_path, fault
):
    """Reading the newest checkpoint fails with a permission error or a device out-of-memory
    error: that is not damage, so nothing is moved to checkpoints.corrupt/ and no older
    checkpoint is restored; the run stops with one line (permission: exit 2)."""
    ref_dir, _ = reference
    workdir = str(tmp_path / fault)
    shutil.copytree(ref_dir, workdir)
    os.remove(os.path.join(workdir, "samples.npz"))  # so that the run must restore
    before = wr.digest(workdir)
    proc = wr.launch(cache_dir, workdir, f"--restore_fault=12:{fault}")
    lines = [line for line in proc.stderr.splitlines() if "cannot read checkpoint 12" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "nothing was moved" in lines[0]
    if fault == "permission":
        assert proc.returncode == cli.EXIT_USAGE and lines[0].startswith("error: ")
        assert "permission denied" in lines[0]
    else:
        assert proc.returncode == 1 and lines[0].startswith("error: ")
        assert "RESOURCE_EXHAUSTED" in lines[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
    assert wr.digest(workdir) == before


@pytest.mark.slow
def test_two_processes_agree_on_the_checkpoint_to_restore(reference, cache_dir, tmp_path):
    """Only process 1 finds checkpoint 12 damaged: both fall back to 8 (no hang, no split)."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "agree")
    shutil.copytree(ref_dir, workdir)
    os.remove(os.path.join(workdir, "samples.npz"))
    args = ["--unreadable_on_process=1:12", "--config.sample.num_samples=0"]
    outs = wr.run_processes(cache_dir, workdir, *args)
    assert "resuming from the checkpoint of step 8" in outs[0][0]
    assert "checkpoint 12" in outs[0][1] and "moved to" in outs[0][1]
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-5)


@pytest.mark.slow
def test_random_kills_then_resume_give_the_uninterrupted_run_bit_for_bit(
    cache_dir, tmp_path, capsys
):
    """The chaos test: five SIGKILLs at random moments, three of them while a checkpoint is being
    written (asynchronously), the run re-run after each; metrics, the final EMA parameters and
    the final samples equal an uninterrupted run's bit for bit. ``python -m experiments.chaos``
    is the long variant on the digits recipe."""
    args = ["--config.train.num_steps=30", "--config.train.checkpoint_every=3"]
    ref_dir, workdir = str(tmp_path / "reference"), str(tmp_path / "chaos")
    wr.check_ok(wr.launch(cache_dir, ref_dir, *args))
    env = wr.env(cache_dir)
    modes = ["in_save", "random", "in_save", "random", "in_save"]
    records = chaos.run_with_kills(
        [sys.executable, wr.WORKER, *args],
        workdir,
        kills=len(modes),
        rng=np.random.default_rng(0),
        max_delay_s=6.0,
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
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])


def test_a_finished_run_with_other_sample_settings_says_it_keeps_its_samples(
    reference, cache_dir, tmp_path
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "finished")
    shutil.copytree(ref_dir, workdir)
    before = wr.digest(os.path.join(workdir, "checkpoints"))
    proc = wr.launch(cache_dir, workdir, "--config.sample.num_steps=5")
    wr.check_ok(proc)
    assert "samples.npz is kept as written: the changed sample.num_steps" in proc.stdout
    assert "experiments.sample" in proc.stdout
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
    assert wr.digest(os.path.join(workdir, "checkpoints")) == before
