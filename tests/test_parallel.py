"""Tests of ddpm_jax.parallel on 8 simulated CPU devices: shard_map vs pmap, 1 vs 8 devices,
scanned steps, batch layout, per-example keys and donation.

Tolerances: the gradient mean is an all-reduce whose summation order depends on the device
count, so 1-vs-8-device results agree to float32 rounding (losses rtol 1e-5 over 6 steps,
parameters atol 1e-5); shard_map and pmap compile the same per-device program and agree to
atol 1e-6 (bitwise in practice).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import parallel, schedules, state as st

B, H, C, T = 16, 4, 1, 50


class TinyDenoiser(nn.Module):
    """Two convolutions and a timestep embedding: small enough to compile in about a second."""

    @nn.compact
    def __call__(self, x, t):
        h = nn.Conv(8, (3, 3))(x) + nn.Embed(T, 8)(t)[:, None, None, :]
        return nn.Conv(C, (3, 3))(nn.swish(h))


MODEL = TinyDenoiser()
SCHEDULE = schedules.linear(T, beta_start=1e-3, beta_end=0.2)
OPT = st.make_optimizer(lr=1e-2, warmup_steps=2)


def _apply_fn(params, x_t, t, y=None, rng=None, example_index=None):
    return MODEL.apply(params, x_t, t)


STEP_FN = st.make_train_step(
    _apply_fn,
    SCHEDULE,
    OPT,
    st.StepSettings(seed=0, global_batch_size=B),
    map_grads=st.pmean_grads(parallel.AXIS),
    lr_schedule=st.learning_rate_schedule(1e-2, 2),
)


def _initial_state():
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, H, H, C)), jnp.zeros((1,), jnp.int32))
    return jax.device_get(st.create_train_state(params, OPT))


def _batches(num_steps):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (num_steps, B, H, H, C)).astype(np.float32)
    labels = np.zeros((num_steps, B), np.int32)
    index = np.tile(np.arange(B, dtype=np.int32), (num_steps, 1))
    return {"image": images, "label": labels, "index": index}


def _train(kind, num_devices, steps_per_call, num_steps=6):
    """Runs ``num_steps`` steps; returns (per-step [loss, grad_norm], final state on the host).

    The gradient norm is compared too: Adam is nearly invariant to the scale of the gradient, so
    a sum instead of a mean over devices would hardly show in the parameters.
    """
    dp = parallel.DataParallel(kind, parallel.make_mesh(jax.devices()[:num_devices]))
    state = dp.to_step(dp.replicate_host(_initial_state()))
    fn = dp.wrap(STEP_FN)
    batches, losses = _batches(num_steps), []
    for start in range(0, num_steps, steps_per_call):
        chunk = {k: v[start : start + steps_per_call] for k, v in batches.items()}
        state, metrics = fn(state, dp.shard_batch(chunk))
        m = dp.metrics_to_host(metrics)
        losses.append(np.stack([m["loss"], m["grad_norm"]], axis=1))
    return np.concatenate(losses), jax.device_get(dp.from_step(state))


@pytest.fixture(scope="module")
def shard_map_8():
    return _train("shard_map", 8, steps_per_call=2)


def _max_param_diff(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def test_pmap_equals_shard_map(shard_map_8):
    losses, state = shard_map_8
    losses_p, state_p = _train("pmap", 8, steps_per_call=2)
    assert int(state.step) == int(state_p.step) == 6
    np.testing.assert_allclose(losses_p, losses, rtol=0, atol=1e-6)
    assert _max_param_diff(state_p.params, state.params) <= 1e-6
    assert _max_param_diff(state_p.ema_params, state.ema_params) <= 1e-6
    assert _max_param_diff(state_p.opt_state, state.opt_state) <= 1e-6


def test_one_device_equals_eight_devices(shard_map_8):
    losses, state = shard_map_8
    losses_1, state_1 = _train("shard_map", 1, steps_per_call=2)
    np.testing.assert_allclose(losses_1, losses, rtol=1e-5)
    assert _max_param_diff(state_1.params, state.params) <= 1e-5
    # The parameters did move: the comparison is not between two untouched states.
    assert _max_param_diff(state.params, _initial_state().params) > 1e-3


def test_steps_per_call_does_not_change_results(shard_map_8):
    losses, state = shard_map_8
    losses_1, state_1 = _train("shard_map", 8, steps_per_call=1)
    np.testing.assert_allclose(losses_1, losses, rtol=1e-6)
    assert _max_param_diff(state_1.params, state.params) <= 1e-6


@pytest.mark.parametrize("kind", parallel.DataParallel.KINDS)
def test_each_device_draws_the_noise_of_its_own_global_rows(kind):
    """Every device draws from the keys of the global rows it holds: no key is replicated."""
    dp = parallel.DataParallel(kind)

    def step_fn(state, batch):
        keys = st.example_keys(0, state, batch["index"])
        t, _, _ = st.draw_example_randomness(keys, (1,), T, 0.0)
        row_of_first = batch["index"][0]
        return state, {"t": jax.lax.all_gather(t, parallel.AXIS, tiled=True), "r": row_of_first}

    batch = _batches(1)
    state = dp.to_step(dp.replicate_host(np.int32(0)))
    _, out = dp.wrap(step_fn, donate=False)(state, dp.shard_batch(batch))
    t = dp.metrics_to_host(out)["t"][0]
    want, _, _ = st.draw_example_randomness(st.example_keys(0, 0, jnp.arange(B)), (1,), T, 0.0)
    np.testing.assert_array_equal(t, want)
    assert len(set(t.tolist())) > B // 2  # not one key per device repeated


@pytest.mark.parametrize("kind", parallel.DataParallel.KINDS)
def test_batch_layout_and_donation(kind):
    dp = parallel.DataParallel(kind)
    rows = np.arange(B, dtype=np.int32)
    sharded = dp.shard_batch({"index": rows[None]})["index"]
    per_device = B // dp.num_devices
    for shard in sharded.addressable_shards:
        j = dp.devices.index(shard.device)
        np.testing.assert_array_equal(
            np.asarray(shard.data).reshape(-1), rows[j * per_device : (j + 1) * per_device]
        )
    state = dp.to_step(dp.replicate_host({"w": np.ones(3, np.float32)}))
    fn = dp.wrap(lambda s, b: (jax.tree.map(lambda w: w + 1, s), {"n": jnp.float32(0)}))
    new, _ = fn(state, dp.shard_batch({"index": rows[None]}))
    assert state["w"].is_deleted()  # donated
    np.testing.assert_array_equal(jax.device_get(dp.from_step(new))["w"], 2.0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="parallel='vmap'.*shard_map"):
        parallel.DataParallel("vmap")


def test_cpu_compiler_options_move_convolutions_to_eigen_without_changing_results():
    """On CPU the engine compiles with options that leave convolutions to Eigen (not YNNPACK);
    the wrapped step carries them and computes the same function."""
    options = parallel.compiler_options()
    if options is None:
        pytest.skip("this XLA has no YNNPACK fusion option")
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
    k = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    default = jax.jit(conv).lower(x, k).compile()
    eigen = jax.jit(conv, compiler_options=options).lower(x, k).compile()
    assert "__ynn_fusion" in default.as_text()  # XLA's default: a YNNPACK convolution
    assert "__ynn_fusion" not in eigen.as_text()
    np.testing.assert_allclose(eigen(x, k), default(x, k), rtol=1e-5, atol=1e-4)


def test_wrapped_step_is_compiled_with_the_compiler_options(monkeypatch):
    """DataParallel.wrap hands parallel.compiler_options to XLA (an invalid value is rejected)."""
    bad = {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"}
    monkeypatch.setattr(parallel.layout, "compiler_options", lambda devices=None: bad)
    dp = parallel.DataParallel("shard_map", parallel.make_mesh(jax.devices()[:1]))
    state = dp.to_step(dp.replicate_host(_initial_state()))
    with pytest.raises(Exception, match="NOT_A_FUSION_TYPE"):
        dp.wrap(STEP_FN).lower(state, dp.shard_batch(_batches(1))).compile()
