"""End-to-end tests of ``config.parallel="fsdp"`` on the tiny digits run of ``_train_worker.py``.

Runs are subprocesses that share a JAX compilation cache (each program compiles once): 10 steps,
checkpoints every 4 steps, leaves of 256 elements or more sharded (``mesh.fsdp_min_size``) so
that the tiny UNet's kernels are sharded. Three uninterrupted references (shard_map on 8 and on 4
devices, fsdp on 8) and:

- fsdp = shard_map on 8 devices, and each device holds about 1/8 of the state under fsdp;
- a checkpoint of fsdp on 8 devices resumes under shard_map on 4, and the reverse;
- 2 processes x 4 devices (jax.distributed on loopback, gloo) under fsdp = 1 process x 8;
- sampling from the fsdp run (``runs.load_run``) reproduces the run's own final samples.

Tolerances: the layouts sum the gradient in different orders (float32 rounding only).
"""

import os
import re
import shutil

import _worker_runs as wr
import jax
import numpy as np
import pytest

from ddpm_jax import runs
from ddpm_jax.workdir import FINAL_TAG, run_key

COMMON = (
    "--config.train.num_steps=10",
    "--config.train.checkpoint_every=4",
    "--config.mesh.fsdp_min_size=256",
    "--config.sample.num_samples=0",
    "--config.sample.grid_size=0",
)


def _launch(cache_dir, workdir, *args, devices=8):
    """The stdout of a run with the COMMON flags (which must succeed)."""
    proc = wr.launch(cache_dir, workdir, *COMMON, *args, devices=devices)
    wr.check_ok(proc)
    return proc.stdout


def _state_bytes(stdout):
    """(per device, total, replicated) from the run's "training state" line."""
    m = re.search(r"([\d,]+) bytes per device of ([\d,]+) \(([\d,]+) replicated", stdout)
    return tuple(int(g.replace(",", "")) for g in m.groups())


def _run(tmp_path_factory, cache_dir, name, *args, devices=8):
    workdir = str(tmp_path_factory.mktemp("runs") / name)
    return workdir, _launch(cache_dir, workdir, *args, devices=devices)


@pytest.fixture(scope="module")
def shard_map_8(tmp_path_factory, cache_dir):
    return _run(tmp_path_factory, cache_dir, "shard_map_8")


@pytest.fixture(scope="module")
def fsdp_8(tmp_path_factory, cache_dir):
    samples = ("--config.sample.num_samples=16",)  # sampling from sharded EMA parameters
    return _run(tmp_path_factory, cache_dir, "fsdp_8", "--config.parallel=fsdp", *samples)


@pytest.fixture(scope="module")
def shard_map_4(tmp_path_factory, cache_dir):
    return _run(tmp_path_factory, cache_dir, "shard_map_4", devices=4)


@pytest.mark.slow
def test_fsdp_equals_shard_map_and_each_device_holds_an_eighth(shard_map_8, fsdp_8):
    (ref_dir, ref_out), (workdir, out) = shard_map_8, fsdp_8
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-4)
    assert len(wr.losses(workdir)) == 10
    assert wr.max_diff(wr.params(workdir, 10), wr.params(ref_dir, 10)) < 1e-5

    per_device, total, replicated = _state_bytes(out)  # measured from addressable shards
    assert _state_bytes(ref_out) == (total, total, total)  # shard_map: all of it everywhere
    assert replicated < total / 20  # biases and norm scales of the tiny UNet
    assert per_device <= (total - replicated) / 8 + replicated
    print(f"\n  fsdp on 8 devices: {per_device:,} of {total:,} bytes ({replicated:,} replicated)")


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved, resumed", [(("fsdp", 8), ("shard_map", 4)), (("shard_map", 4), ("fsdp", 8))]
)
def test_a_checkpoint_resumes_under_another_layout_and_device_count(
    request, cache_dir, tmp_path, saved, resumed
):
    ref_dir, _ = request.getfixturevalue("_".join(map(str, saved)))
    request.getfixturevalue("_".join(map(str, resumed)))  # compiles the resumed program first
    workdir = str(tmp_path / "moved")
    shutil.copytree(ref_dir, workdir)
    for step in (8, 10):  # only the checkpoint of step 4 is left
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    kind, devices = resumed
    out = _launch(cache_dir, workdir, f"--config.parallel={kind}", devices=devices)
    assert "resuming from the checkpoint of step 4" in out
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-4)
    assert wr.max_diff(wr.params(workdir, 10), wr.params(ref_dir, 10)) < 1e-5


# Two processes compile their own programs side by side (~30 s on 2 idle cores).
@pytest.mark.slow
def test_two_processes_equal_one_process_under_fsdp(fsdp_8, cache_dir, tmp_path):
    """2 processes x 4 devices, the fsdp axis across both (mesh.fsdp = 8), = 1 process x 8."""
    ref_dir, _ = fsdp_8
    workdir = str(tmp_path / "two_processes")
    wr.run_processes(cache_dir, workdir, *COMMON, "--config.parallel=fsdp")
    np.testing.assert_allclose(wr.losses(workdir), wr.losses(ref_dir), rtol=1e-5)
    assert wr.max_diff(wr.params(workdir, 10), wr.params(ref_dir, 10)) < 1e-5  # both wrote shards


@pytest.mark.slow
def test_sampling_from_an_fsdp_run_reproduces_its_samples(fsdp_8):
    workdir, _ = fsdp_8
    run = runs.load_run(workdir)
    assert run.dp.kind == "fsdp" and run.dp.num_devices == 8
    assert all(x.is_fully_replicated for x in jax.tree.leaves(run.ema_params))  # gathered once
    images, labels = run.generator()(run.ema_params, run_key(run.config.seed, FINAL_TAG), 16)
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        np.testing.assert_array_equal(labels, f["labels"])
        np.testing.assert_array_equal(images, f["images"])
