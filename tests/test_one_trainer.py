"""A run is trained by one job at a time, and never silently restarted: the workdir lock, and a
workdir whose checkpoints are gone while its records remain."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import cli
from ddpm_jax.errors import UsageError
from ddpm_jax.run_start import records_of_checkpoints
from ddpm_jax.workdir import LOCK_FILE, trainer_lock

_HOLD = """
import sys, time
from ddpm_jax.workdir import trainer_lock
with trainer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(workdir):
    """A process holding the lock of ``workdir`` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, workdir], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _holder(workdir)
    try:
        with pytest.raises(UsageError, match=rf"being trained by .*pid {holder.pid} on host"):
            with trainer_lock(workdir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with trainer_lock(workdir):  # the kernel released it with the process
        with trainer_lock(workdir):  # re-entrant: a run's phases nest
            pass
        assert f"pid {os.getpid()} " in open(os.path.join(workdir, LOCK_FILE)).read()


@pytest.mark.slow
def test_a_second_trainer_exits_at_once_and_the_first_goes_on(reference, cache_dir, tmp_path):
    """The acceptance run: a second experiments run on a workdir being trained exits 2 within
    30 s with one line; after kill -9 of the first, the same command resumes."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    args = ["--config.train.num_steps=40", "--sleep_per_step=0.3"]
    first = wr.launch(cache_dir, workdir, *args, wait=False)
    try:
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        t0 = time.time()
        second = wr.launch(cache_dir, workdir, *args)
        assert time.time() - t0 < 30
        errors = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == cli.EXIT_USAGE and len(errors) == 1, second.stderr
        assert f"being trained by another job (pid {first.pid} on host" in errors[0]
        assert "resuming" not in second.stdout and "new run" not in second.stdout
        assert first.poll() is None  # the first trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    resumed = wr.launch(cache_dir, workdir, *args)
    wr.check_ok(resumed)
    assert "resuming from the checkpoint of step" in resumed.stdout
    # Same seed and data as the 12-step reference (constant lr after warm-up): same first steps.
    np.testing.assert_array_equal(wr.losses(workdir)[:12], wr.losses(ref_dir))
    assert [m["step"] for m in wr.metrics(workdir)] == list(range(1, 41))


def test_records_of_checkpoints_tell_a_lost_run_from_one_stopped_before_its_first(tmp_path):
    d = str(tmp_path)

    def log(*steps):
        with open(os.path.join(d, "metrics.jsonl"), "a") as f:
            f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps)

    assert records_of_checkpoints(d, 4) == ""  # a new run
    log(1, 2, 3, 4, 5, 6, 7, 8)
    # Killed while the first or second checkpoint was written: none may be complete.
    assert records_of_checkpoints(d, 4) == ""
    log(9)  # the save of step 8 started after the one of step 4 was complete
    assert records_of_checkpoints(d, 4) == "metrics.jsonl up to step 9"
    assert records_of_checkpoints(d, 4, steps_per_call=2) == ""  # 8 may be the call of step 9
    assert records_of_checkpoints(d, 10) == ""
    with open(os.path.join(d, "config.json"), "w") as f:  # the run saved every 5 steps
        json.dump({"train": {"checkpoint_every": 5}}, f)
    assert records_of_checkpoints(d, 4) == ""  # the larger of the two
    open(os.path.join(d, "samples.npz"), "wb").close()
    assert records_of_checkpoints(d, 10).startswith("samples.npz")


def test_a_run_whose_checkpoints_are_gone_is_refused_until_the_user_starts_over(
    reference, cache_dir, tmp_path, capfd
):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    shutil.move(os.path.join(workdir, "checkpoints"), str(tmp_path / "moved_away"))
    before = wr.digest(workdir)
    code, err = wr.cli_error(["prog", f"--workdir={workdir}"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "holds the records of a run (samples.npz, metrics.jsonl up to step 12)" in err[0]
    assert "no checkpoint" in err[0] and "--start_over" in err[0]
    assert wr.digest(workdir) == before  # every file unchanged (sha256), the lock file aside

    proc = wr.launch(cache_dir, workdir, "--start_over")
    wr.check_ok(proc)
    assert "new run in" in proc.stdout
    moved = wr.digest(workdir)
    for name in ("metrics.jsonl", "samples.npz", "report.png", "samples/step_0000012.png"):
        top, _, rest = name.partition("/")
        end = f".before-step-0/{rest}" if rest else ".before-step-0"
        kept = [k for k in moved if k.startswith(f"{top}.") and k.endswith(end)]
        assert len(kept) == 1 and moved[kept[0]] == before[name], (name, kept)
    np.testing.assert_array_equal(wr.losses(workdir), wr.losses(ref_dir))  # the same run again
