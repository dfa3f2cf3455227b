"""Readers of a run (``experiments.sample``, ``experiments.evaluate``, ``runs.load_run``) change
nothing in its checkpoints, even while it trains: an Orbax temporary directory (a save in
progress) is left alone and ignored, and the training run is not disturbed.

- a finished run with a ``N.orbax-checkpoint-tmp-…`` folder: sampling and evaluating it leave
  ``checkpoints/`` byte for byte as it was (fast, in-process);
- a slow digits run that keeps only its last 5 checkpoints trains while both commands read it
  in a loop (subprocesses): it finishes, with the metrics, final parameters, samples and
  checkpoint steps of an undisturbed run, bit for bit (slow).
"""

import os
import shutil
import subprocess
import sys
import time

import _worker_runs as wr
import numpy as np
import pytest

from experiments import evaluate, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_and_evaluate_leave_a_save_in_progress_alone(reference, tmp_path, capsys):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    in_flight = os.path.join(ckpt_dir, "16.orbax-checkpoint-tmp-1754000000123456")
    os.makedirs(os.path.join(in_flight, "default"))
    with open(os.path.join(in_flight, "default", "_METADATA"), "w") as f:
        f.write('{"partial": ')
    before = wr.digest(ckpt_dir)

    out = sample.main(["sample", f"--workdir={workdir}", "--num_samples=4"])
    assert out.startswith(os.path.join(workdir, "sampled") + os.sep)
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (4, 8, 8, 1)
    evaluate.main(
        [
            "evaluate",
            f"--workdir={workdir}",
            "--num_samples=16",
            "--kid_num_subsets=2",
            f"--cache_dir={tmp_path / 'stats'}",
        ]
    )
    assert os.listdir(os.path.join(workdir, "eval"))
    assert wr.digest(ckpt_dir) == before  # the in-flight folder too, byte for byte
    assert not os.path.exists(ckpt_dir + ".corrupt")
    assert "checkpoint of step 12" not in capsys.readouterr().err  # no warning: 12 is complete


def _reader(cache_dir, module, workdir, *args):
    cmd = [sys.executable, "-m", f"experiments.{module}", f"--workdir={workdir}", *args]
    pipe = subprocess.PIPE
    return subprocess.Popen(
        cmd, cwd=REPO, env=wr.env(cache_dir), stdout=pipe, stderr=pipe, text=True
    )


@pytest.mark.slow
def test_a_run_read_while_it_trains_is_not_disturbed(cache_dir, tmp_path):
    """60 steps, a checkpoint every 3 of which 5 are kept (old ones are deleted while they may be
    read), slowed to 0.5 s a step so that samplers and evaluations start during training."""
    args = [
        "--config.train.num_steps=60",
        "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=5",
        "--config.train.log_every=3",
    ]
    quiet = str(tmp_path / "undisturbed")
    wr.check_ok(wr.launch(cache_dir, quiet, *args))

    workdir = str(tmp_path / "read")
    run = wr.launch(cache_dir, workdir, *args, "--sleep_per_step=0.5", wait=False)
    reads = {"sample": 0, "evaluate": 0}
    during = 0  # readers that finished while the run was training
    try:
        deadline = time.time() + 600
        while not _has_checkpoint(workdir):
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        modules = ["sample", "evaluate"]
        while run.poll() is None or min(reads.values()) == 0:
            module = modules[sum(reads.values()) % 2]
            extra = ["--num_samples=8"]
            if module == "evaluate":
                extra = ["--num_samples=16", "--kid_num_subsets=2", f"--cache_dir={tmp_path}"]
            reader = _reader(cache_dir, module, workdir, *extra)
            out, err = reader.communicate(timeout=600)
            assert reader.returncode == 0, f"{module}: {out}\n{err[-3000:]}"
            reads[module] += 1
            during += run.poll() is None
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, f"{out}\n{err[-3000:]}"
    assert during >= 1, reads  # at least one read overlapped the training

    timing = ("steps_per_sec", "elapsed_s")
    untimed = lambda d: [{k: v for k, v in m.items() if k not in timing} for m in wr.metrics(d)]
    assert untimed(workdir) == untimed(quiet)  # every logged value but the clock, exactly
    assert wr.checkpoint_steps(workdir) == wr.checkpoint_steps(quiet) == [48, 51, 54, 57, 60]
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
    got, want = wr.params(workdir, 60, "ema_params"), wr.params(quiet, 60, "ema_params")
    assert wr.max_diff(got, want) == 0.0
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{quiet}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def _has_checkpoint(workdir):
    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(path) and bool(wr.checkpoint_steps(workdir))
