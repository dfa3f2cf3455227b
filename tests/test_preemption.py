"""SIGTERM in every phase: the guard itself, and two processes preempted during the final
sampling (the end-to-end runs use ``tests/_train_worker.py``)."""

import os
import signal
import time

import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax.preemption import PreemptionGuard


def test_the_guard_turns_sigterm_into_a_request_seen_by_nested_guards():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as outer:
        with PreemptionGuard() as inner:
            assert not inner.reached() and not outer.reached()
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.reached() and inner.requested
        assert outer.reached()  # the notice reached the outer guard too
        with PreemptionGuard() as late:
            assert late.requested  # entered after the notice
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_two_processes_preempted_while_sampling_write_nothing_and_the_rerun_samples_as_usual(
    cache_dir, tmp_path
):
    """2 processes x 2 devices, SIGTERM to both after the first of 8 rounds of the final
    sampling: both exit 0 within 60 s with no samples.npz; the re-run writes the samples of an
    uninterrupted run bit for bit."""
    args = ["--config.sample.num_samples=64", "--config.sample.batch_size=8"]
    ref_dir, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "preempted")
    wr.run_processes(cache_dir, ref_dir, *args, devices=2)

    t0 = time.time()
    outs = wr.run_processes(cache_dir, workdir, *args, "--signal_in_sampling=SIGTERM", devices=2)
    assert time.time() - t0 < 60, "both processes exit 0 within 60 s (start and training included)"
    assert "preempted (SIGTERM) while sampling" in outs[0][0], outs[0][0]
    assert not os.path.exists(os.path.join(workdir, "samples.npz"))
    assert wr.checkpoint_steps(workdir)[-1] == 12  # training had finished and was saved

    outs = wr.run_processes(cache_dir, workdir, *args, devices=2)  # the same command again
    assert "training already finished" in outs[0][0]
    with np.load(f"{workdir}/samples.npz") as a, np.load(f"{ref_dir}/samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
