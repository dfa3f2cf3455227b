"""Tests of ddpm_jax.checkpoint: round trip, keep-last-K, asynchronous saves with donation,
fallback past corrupt or incomplete checkpoints (and only those: faults of the environment stop
with nothing moved), and read-only readers."""

import errno
import glob
import json
import os

import _worker_runs as wr
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import failures, parallel, state as st
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.errors import CheckpointFault, UsageError

OPT = st.make_optimizer(lr=1e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def dp():
    return parallel.DataParallel("shard_map")


def _init():
    params = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}}
    return st.create_train_state(params, OPT)


def _abstract(dp):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dp.replicated),
        jax.eval_shape(_init),
    )


def _state_at(dp, step):
    """A replicated state whose every float leaf is shifted by ``step``."""
    s = jax.jit(_init, out_shardings=dp.replicated)()
    shift = lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(shift, s.replace(step=jnp.int32(step)))


def _save_steps(dp, directory, steps, max_to_keep=10):
    ckpt = Checkpointer(directory, max_to_keep=max_to_keep)
    for s in steps:
        assert ckpt.save(s, _state_at(dp, s))
    ckpt.close()


def _assert_state_equal(got, want):
    assert type(got) is type(want)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want
    )


def test_round_trip_keep_last_and_no_overwrite(dp, tmp_path):
    d = str(tmp_path / "ckpt")
    ckpt = Checkpointer(d, max_to_keep=2)
    for s in (1, 2, 3):
        assert ckpt.save(s, _state_at(dp, s))
    assert not ckpt.save(3, _state_at(dp, 99))  # an existing step is never overwritten
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    restored, step = ckpt.restore_latest(_abstract(dp))
    ckpt.close()
    assert step == 3
    _assert_state_equal(restored, _state_at(dp, 3))
    assert restored.params["params"]["w"].sharding == dp.replicated


def test_async_save_is_safe_with_donation(dp, tmp_path):
    """Donating the state right after save() cannot corrupt the checkpoint being written (the
    host copy is taken inside save(); JAX does not reuse a buffer while a host view is alive)."""
    d = str(tmp_path / "ckpt")
    ckpt = Checkpointer(d, max_to_keep=2)
    state = _state_at(dp, 5)
    want = jax.device_get(state)
    ckpt.save(5, state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 7, s), donate_argnums=0)
    bumped = jax.block_until_ready(bump(state))
    np.testing.assert_array_equal(np.asarray(bumped.params["params"]["w"]), -7.0)
    ckpt.wait()
    restored = ckpt.restore(5, _abstract(dp))
    ckpt.close()
    _assert_state_equal(jax.device_get(restored), want)


# A failed tensorstore read can leave a callback for Orbax's closed event loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage", ["truncate_data", "garbage_data", "delete_metadata", "garbage_metadata"]
)
def test_corrupt_latest_falls_back_to_previous(dp, tmp_path, capfd, damage):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 8))
    files = glob.glob(f"{d}/8/default/d/*")
    assert files
    if damage == "truncate_data":
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    elif damage == "garbage_data":  # same size, the second half overwritten
        for f in files:
            with open(f, "r+b") as fh:
                size = os.path.getsize(f)
                fh.seek(size // 2)
                fh.write(b"\xa5" * (size - size // 2))
    elif damage == "delete_metadata":
        os.remove(f"{d}/8/default/_METADATA")
    else:
        with open(f"{d}/8/default/_METADATA", "w") as fh:
            fh.write("{garbage")
    ckpt = Checkpointer(d, max_to_keep=10)
    restored, step = ckpt.restore_latest(_abstract(dp))
    err = capfd.readouterr().err
    assert step == 4
    _assert_state_equal(restored, _state_at(dp, 4))
    assert "warning: checkpoint 8" in err and "resuming from step 4" in err
    # The bad checkpoint is moved aside (kept for inspection), so step 8 can be saved again.
    assert ckpt.all_steps() == [4]
    assert [p.split("-")[0] for p in os.listdir(d + ".corrupt")] == ["8"]
    assert ckpt.save(8, _state_at(dp, 8))
    ckpt.close()


def test_none_readable_is_an_error_unless_the_user_starts_over(dp, tmp_path, capfd):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4,))
    os.remove(f"{d}/4/default/_METADATA")
    # What a save killed mid-way leaves behind: an Orbax temporary directory.
    os.makedirs(f"{d}/9.orbax-checkpoint-tmp-1234/default")
    ckpt = Checkpointer(d, max_to_keep=10)
    assert ckpt.all_steps() == [4]  # the incomplete step 9 is not a checkpoint
    with pytest.raises(UsageError, match="no checkpoint .* can be restored: 4 .*--start_over"):
        ckpt.restore_latest(_abstract(dp))
    assert ckpt.all_steps() == [4] and not os.path.exists(d + ".corrupt")  # nothing changed
    restored, step = ckpt.restore_latest(_abstract(dp), start_over=True)
    ckpt.close()
    assert restored is None and step is None
    assert "starting from step 0 (--start_over)" in capfd.readouterr().err
    assert [p.split("-")[0] for p in os.listdir(d + ".corrupt")] == ["4"]  # moved, not deleted
    assert not os.path.exists(f"{d}/9.orbax-checkpoint-tmp-1234")  # cleaned up


def test_a_state_of_another_structure_is_a_usage_error_not_damage(dp, tmp_path):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 8))
    other = lambda: st.create_train_state({"params": {"w": jnp.zeros((2, 5))}}, OPT)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dp.replicated),
        jax.eval_shape(other),
    )
    ckpt = Checkpointer(d, max_to_keep=10)
    with pytest.raises(UsageError, match=r"checkpoint 8 .* another structure .*\(2, 3\)"):
        ckpt.restore_latest(abstract)
    ckpt.close()
    assert sorted(os.listdir(d)) == ["4", "8"] and not os.path.exists(d + ".corrupt")


def test_read_only_ignores_a_save_in_progress_and_changes_nothing(dp, tmp_path):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 6))
    # A save in progress of another process (the training run): Orbax's temporary directory.
    os.makedirs(f"{d}/7.orbax-checkpoint-tmp-123/default")
    with open(f"{d}/7.orbax-checkpoint-tmp-123/default/_METADATA", "w") as fh:
        fh.write("{partial")
    before = wr.digest(str(tmp_path))
    ckpt = Checkpointer(d, read_only=True)
    assert ckpt.all_steps() == [4, 6]
    restored, step = ckpt.restore_latest(_abstract(dp))
    assert step == 6
    _assert_state_equal(restored, _state_at(dp, 6))
    with pytest.raises(RuntimeError, match="read-only"):
        ckpt.save(8, _state_at(dp, 8))
    ckpt.close()
    assert wr.digest(str(tmp_path)) == before  # the temporary directory too, byte for byte

    missing = str(tmp_path / "none")
    ckpt = Checkpointer(missing, read_only=True)
    assert ckpt.restore_latest(_abstract(dp)) == (None, None)
    ckpt.close()
    assert not os.path.exists(missing)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_only_skips_a_damaged_checkpoint_and_leaves_it(dp, tmp_path, capfd):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 8))
    os.remove(f"{d}/8/default/_METADATA")
    before = wr.digest(str(tmp_path))
    ckpt = Checkpointer(d, read_only=True)
    restored, step = ckpt.restore_latest(_abstract(dp))
    ckpt.close()
    assert step == 4
    _assert_state_equal(restored, _state_at(dp, 4))
    assert "checkpoint 8" in capfd.readouterr().err
    assert wr.digest(str(tmp_path)) == before


# What reading a checkpoint raised, and what it says about the checkpoint. The tensorstore and
# JSON errors are the ones Orbax 0.12 raised for the damage named (tests above make them).
_TS = 'Error reading "step/.zarray" in OCDBT database at local file "/c/8/default/"'
READ_FAILURES = [
    (ValueError(f"OUT_OF_RANGE: {_TS}: Error reading Byte range [0, 422)"), "damaged"),  # short
    (ValueError(f"NOT_FOUND: {_TS}"), "damaged"),  # a data file deleted
    (ValueError(f"DATA_LOSS: {_TS}: Error decoding local file"), "damaged"),  # garbage manifest
    (ValueError(f"{_TS}: ZSTD_decompressStream() failed: Data corruption detected"), "damaged"),
    (
        ValueError('FAILED_PRECONDITION: Error reading local file "/c/_sharding": Invalid JSON'),
        "damaged",
    ),
    (json.JSONDecodeError("Expecting value", "", 0), "damaged"),  # garbage _METADATA
    (FileNotFoundError("Metadata file (named _METADATA) does not exist"), "damaged"),
    (PermissionError(errno.EACCES, "Permission denied"), "denied"),
    (OSError(errno.EPERM, "Operation not permitted"), "denied"),
    (ValueError(f"PERMISSION_DENIED: {_TS}: Permission denied [os_error_code='13']"), "denied"),
    (OSError(errno.EIO, "Input/output error"), "fault"),
    (ValueError(f"UNKNOWN: {_TS}: Input/output error [os_error_code='5']"), "fault"),
    (ValueError(f"NOT_FOUND: {_TS}: Stale file handle [os_error_code=116]"), "fault"),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes"), "fault"),
    (RuntimeError("something nobody anticipated"), "fault"),
]


@pytest.mark.parametrize("error, kind", READ_FAILURES, ids=[f[1] for f in READ_FAILURES])
def test_read_failure_needs_evidence_of_damage(error, kind):
    assert failures.read_failure(error) == kind
    try:  # the same, wrapped by Orbax
        raise RuntimeError("restore failed") from error
    except RuntimeError as wrapped:
        assert failures.read_failure(wrapped) == kind


def _read_raising(error):
    def read(self, step, abstract_state):
        raise error

    return read


@pytest.mark.parametrize(
    "error, raised",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/x/8"), UsageError),
        (OSError(errno.EIO, "Input/output error", "/x/8"), CheckpointFault),
        (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (test)"), CheckpointFault),
        (RuntimeError("unknown"), CheckpointFault),
    ],
    ids=["permission", "eio", "oom", "unknown"],
)
def test_a_fault_while_restoring_stops_and_moves_nothing(dp, tmp_path, monkeypatch, error, raised):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 8))
    before = wr.digest(str(tmp_path))
    monkeypatch.setattr(Checkpointer, "_read", _read_raising(error))
    ckpt = Checkpointer(d, max_to_keep=10)
    with pytest.raises(raised) as info:
        ckpt.restore_latest(_abstract(dp))
    ckpt.close()
    message = str(info.value)
    assert "checkpoint 8" in message and "nothing was moved" in message
    assert "\n" not in message
    assert wr.digest(str(tmp_path)) == before and not os.path.exists(d + ".corrupt")


def test_write_failure_recognises_a_full_disk_in_orbax_background_write():
    assert failures.write_failure(OSError(errno.ENOSPC, "x", "/c/8")) == (
        "No space left on device (/c/8)"
    )
    # What Orbax 0.12's background write raised on a full tmpfs (test_resume.py makes it).
    ts = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/c/8.orbax-checkpoint-tmp/_sharding": '
        'Failed writing: "/c/8.orbax-checkpoint-tmp/_sharding.__lock": Failed to write 103529 '
        "bytes to file 4: No space left on device [os_error_code='28']"
    )
    try:
        raise RuntimeError("wrapped") from ts
    except RuntimeError as wrapped:
        assert failures.write_failure(wrapped) == (
            "No space left on device (/c/8.orbax-checkpoint-tmp/_sharding)"
        )
    assert failures.write_failure(OSError(errno.EIO, "x")) is None
    assert failures.write_failure(ValueError("DATA_LOSS: x")) is None
