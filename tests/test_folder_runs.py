"""End-to-end runs on a folder of images (``experiments.folder``, the folder branch of
``ddpm_jax.builders``): the digits written out as image files.

- a run with ``skip_unreadable`` trains without the truncated file and records it;
- the tiny run of ``tests/_train_worker.py`` on a folder: killed with SIGKILL and resumed it is
  bit-identical to an uninterrupted run, 1 device and 2 processes of 2 devices give the losses
  of 4 (rtol 1e-4); the prepared cache is reused by the later runs, and prepared by process 0
  alone on a fresh cache;
- (slow) the acceptance run: the digits as 16x16 files of mixed formats in ten class folders,
  ``experiments.folder`` with every setting at its default but the size, gives guided samples
  the digits classifier recognises as the requested class >= 95% of the time.
"""

import json
import os
import signal
import subprocess
import sys
import time

import _folders
import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import folder_source, images
from ddpm_jax.evaluation import digits_classifier
from experiments import folder as folder_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_skip_unreadable_trains_and_records_the_skipped_file(tmp_path):
    root, workdir = str(tmp_path / "digits"), str(tmp_path / "run")
    _folders.write_digits_folder(root, size=8, limit=40)
    bad = os.path.join(root, "5", "00005.png")
    _folders.truncate(bad)
    argv = ["folder.py", f"--workdir={workdir}", f"--config.data.dir={root}"]
    argv += [f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.image_size=8"]
    argv += ["--config.data.skip_unreadable=True", "--config.model.ch=8"]
    argv += ["--config.model.ch_mult=(1,)", "--config.train.num_steps=2"]
    argv += ["--config.train.batch_size=8", "--config.sample.num_samples=0"]
    argv += ["--config.train.sample_every=0", "--config.train.steps_per_call=1"]
    result = folder_experiment.main(argv)
    assert result.status == "completed" and result.step == 2
    report = json.load(open(os.path.join(workdir, folder_source.REPORT)))
    assert report["skipped"] is True and [u["path"] for u in report["unreadable"]] == [bad]
    info = json.load(open(os.path.join(workdir, folder_source.RUN_INFO)))
    assert info["classes"] == [str(d) for d in range(10)] and info["num_examples"] == 39
    assert info["image_shape"] == [8, 8, 1] and info["unreadable"][0][0] == bad


@pytest.mark.slow
def test_resume_after_kill_is_exact_and_1_device_equals_4(cache_dir, tmp_path):
    root, cache = str(tmp_path / "digits"), str(tmp_path / "cache")
    _folders.write_digits_folder(root, size=8, limit=200)
    args = ["--config.data.name=folder", f"--config.data.dir={root}"]
    args += [f"--config.data.cache_dir={cache}", "--config.data.image_size=8"]
    args += ["--config.sample.num_samples=0"]
    ref = str(tmp_path / "ref")
    first = wr.launch(cache_dir, ref, *args, devices=4)
    wr.check_ok(first)
    assert "preparing" in first.stdout
    killed = str(tmp_path / "killed")
    proc = wr.launch(cache_dir, killed, "--signal_at=10:SIGKILL", *args, devices=4)
    assert proc.returncode == -signal.SIGKILL and "preparing" not in proc.stdout  # cached
    wr.check_ok(wr.launch(cache_dir, killed, *args, devices=4))
    np.testing.assert_array_equal(wr.losses(killed), wr.losses(ref))
    assert wr.max_diff(wr.params(killed, 12), wr.params(ref, 12)) == 0
    one = str(tmp_path / "one")
    wr.check_ok(wr.launch(cache_dir, one, *args, devices=1))
    np.testing.assert_allclose(wr.losses(one), wr.losses(ref), rtol=1e-4)
    # Two processes on a fresh cache: process 0 prepares while process 1 waits, then both read.
    two, fresh = str(tmp_path / "two"), f"--config.data.cache_dir={tmp_path / 'fresh'}"
    outs = wr.run_processes(cache_dir, two, *args, fresh, num_processes=2, devices=2)
    assert "preparing" in outs[0][0]
    assert len(os.listdir(tmp_path / "fresh")) == 1
    np.testing.assert_allclose(wr.losses(two), wr.losses(ref), rtol=1e-4)


@pytest.mark.slow
def test_acceptance_digits_as_a_folder_of_mixed_files(tmp_path):
    """3 min 13 s on 2 idle cores (preparation included); prints the time and the accuracy."""
    root, workdir = str(tmp_path / "digits"), str(tmp_path / "run")
    _folders.write_digits_folder(root, size=16)  # png, jpeg, rgb, rgba, 20x16, 16-bit
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("XLA_FLAGS", None)  # the command as a user runs it (no test device flags)
    cmd = [sys.executable, "-m", "experiments.folder", f"--workdir={workdir}"]
    cmd += [f"--config.data.dir={root}", "--config.data.image_size=16"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.time() - t0
    wr.check_ok(proc)
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        samples, labels = f["images"], f["labels"]
    assert samples.shape == (1000, 16, 16, 1)
    classifier = digits_classifier.train_digits_classifier(seed=0)
    predicted = classifier.predict_proba(images.resize(samples, (8, 8))).argmax(-1)
    accuracy = float(np.mean(predicted == labels))
    print(f"acceptance: {seconds:.0f} s, accuracy {accuracy:.3f}")
    assert accuracy >= 0.95
