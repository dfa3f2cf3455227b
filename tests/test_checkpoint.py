"""Tests of ddpm_jax.checkpoint: round trip, keep-last-K, asynchronous saves with donation,
fallback past corrupt or incomplete checkpoints, and the SIGTERM guard."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel
from ddpm_jax import state as st
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.errors import UsageError

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
@pytest.mark.parametrize("damage", ["truncate_data", "delete_metadata"])
def test_corrupt_latest_falls_back_to_previous(dp, tmp_path, capfd, damage):
    d = str(tmp_path / "ckpt")
    _save_steps(dp, d, (4, 8))
    if damage == "truncate_data":
        files = glob.glob(f"{d}/8/default/d/*")
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    else:
        os.remove(f"{d}/8/default/_METADATA")
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
