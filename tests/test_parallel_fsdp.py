"""Tests of ddpm_jax.parallel.fsdp on 8 simulated CPU devices: the sharding rule, the 2-D mesh and
batch layout, sharded initialisation, and the global-view step against the per-device step.

The one training step (``state.make_train_step``) runs on the global view under FSDP (its
gradients reduced by ``FullyShardedDataParallel.map_grads``) and per device under shard_map
(``DataParallel.map_grads``); the drift test runs both with dropout and label dropout on, so that
the per-example keys, the per-device dropout keys and the gradient mean must all agree. The
gradient sums in another order: float32 rounding only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ddpm_jax import config as config_lib, parallel, resume, schedules, state as st
from ddpm_jax.errors import UsageError
from ddpm_jax.parallel import FullyShardedDataParallel, partition_spec

B, H, C, T, CLASSES = 16, 4, 1, 50, 3


class TinyConditionalDenoiser(nn.Module):
    """Two convolutions, timestep and label embeddings, and dropout keyed like the UNet's: one
    key, each row's mask from (key, its global index)."""

    @nn.compact
    def __call__(self, x, t, y, rng=None, example_index=None):
        h = nn.Conv(16, (3, 3))(x) + nn.Embed(T, 16)(t)[:, None, None, :]
        h = nn.swish(h + nn.Embed(CLASSES + 1, 16)(y)[:, None, None, :])
        if rng is not None:
            bits = lambda i: jax.random.bernoulli(jax.random.fold_in(rng, i), 0.7, h.shape[1:])
            h = jnp.where(jax.vmap(bits)(example_index), h / 0.7, 0.0)
        return nn.Conv(C, (3, 3))(h)


MODEL = TinyConditionalDenoiser()
SCHEDULE = schedules.linear(T, beta_start=1e-3, beta_end=0.2)
OPT = st.make_optimizer(lr=1e-2, warmup_steps=2)
ARGS = dict(
    settings=st.StepSettings(seed=0, global_batch_size=B, p_uncond=0.3),
    lr_schedule=st.learning_rate_schedule(1e-2, 2),
    null_label=CLASSES,
)


def _apply_fn(params, x_t, t, y=None, rng=None, example_index=None):
    return MODEL.apply(params, x_t, t, y, rng, example_index)


def _init():
    x, t = jnp.zeros((1, H, H, C)), jnp.zeros((1,), jnp.int32)
    return st.create_train_state(MODEL.init(jax.random.key(0), x, t, t), OPT)


def _batches(num_steps):
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(-1, 1, (num_steps, B, H, H, C)).astype(np.float32),
        "label": rng.integers(0, CLASSES, (num_steps, B)).astype(np.int32),
        "index": np.tile(np.arange(B, dtype=np.int32), (num_steps, 1)),
    }


def _train(dp, step_fn, num_steps=4, steps_per_call=2):
    abstract = jax.eval_shape(_init)
    state = dp.to_step(jax.jit(_init, out_shardings=dp.state_shardings(abstract))())
    fn, batches, out = dp.wrap(step_fn), _batches(num_steps), []
    for start in range(0, num_steps, steps_per_call):
        chunk = {k: v[start : start + steps_per_call] for k, v in batches.items()}
        state, metrics = fn(state, dp.shard_batch(chunk))
        m = dp.metrics_to_host(metrics)
        out.append(np.stack([m["loss"], m["grad_norm"]], axis=1))
    return np.concatenate(out), dp.from_step(state)


def _max_diff(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize(
    "shape, k, min_size, spec",
    [
        ((3, 3, 256, 512), 8, 2**14, P(None, None, None, "fsdp")),  # the largest divisible dim
        ((3, 3, 128, 128), 8, 2**14, P(None, None, None, "fsdp")),  # ties: the last one
        ((1000, 64), 8, 0, P("fsdp", None)),
        ((1001, 7), 8, 0, P()),  # nothing divides
        ((512,), 8, 2**14, P()),  # a bias: below the threshold
        ((3, 3, 256, 512), 1, 0, P()),  # a 1-device fsdp axis
        ((), 8, 0, P()),  # a scalar (step, Adam's count)
    ],
)
def test_sharding_rule(shape, k, min_size, spec):
    assert partition_spec(shape, k, min_size) == spec


def test_mesh_and_batch_layout():
    dp = FullyShardedDataParallel(4)
    assert dict(dp.mesh.shape) == {"data": 2, "fsdp": 4} and dp.fsdp == 4
    assert dp.devices == parallel.layout.ordered_devices()  # batch order = process order
    rows = np.arange(B, dtype=np.int32)
    sharded = dp.shard_batch({"index": rows[None]})["index"]
    for shard in sharded.addressable_shards:  # device j of the flattened mesh: rows j B/D ...
        j = dp.devices.index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data).reshape(-1), rows[2 * j : 2 * j + 2])
    assert FullyShardedDataParallel().mesh.shape["fsdp"] == 8  # default: all devices
    with pytest.raises(ValueError, match="mesh.fsdp=3 must divide the device count 8"):
        FullyShardedDataParallel(3)


def test_initialisation_is_sharded_and_never_holds_the_whole_state():
    dp = FullyShardedDataParallel(min_size=64)
    abstract = jax.eval_shape(_init)
    shardings = dp.state_shardings(abstract)
    compiled = jax.jit(_init, out_shardings=shardings).lower().compile()
    sizes = parallel.state_bytes(
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    )
    mem = compiled.memory_analysis()
    # Each device writes its shards only: output + temporaries well below the whole state.
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes < sizes["total"] / 2, mem
    state = compiled()
    measured = parallel.state_bytes(state)  # from the arrays' addressable shards
    assert measured == sizes
    assert (
        measured["per_device"]
        <= (measured["total"] - measured["replicated"]) / 8 + (measured["replicated"])
    )
    gathered = dp.gather(state)
    assert all(x.is_fully_replicated for x in jax.tree.leaves(gathered))
    assert _max_diff(jax.device_get(gathered), jax.device_get(jax.jit(_init)())) == 0


def test_global_view_step_equals_the_per_device_step():
    """shard_map on 8 devices (per-device step) = fsdp on a 2 x 4 mesh (global-view step), with
    dropout and label dropout on: the per-example keys, the per-device dropout keys and the
    gradient mean all agree."""
    shard_map = parallel.DataParallel("shard_map")
    per_device = st.make_train_step(_apply_fn, SCHEDULE, OPT, map_grads=shard_map.map_grads, **ARGS)
    fsdp = FullyShardedDataParallel(4, min_size=64)
    global_view = st.make_train_step(_apply_fn, SCHEDULE, OPT, map_grads=fsdp.map_grads, **ARGS)
    losses, state = _train(shard_map, per_device)
    losses_f, state_f = _train(fsdp, global_view)

    np.testing.assert_allclose(losses_f, losses, rtol=1e-5)
    host, host_f = jax.device_get(state), jax.device_get(state_f)
    assert int(host_f.step) == 4
    for part in ("params", "ema_params", "opt_state"):
        assert _max_diff(getattr(host_f, part), getattr(host, part)) <= 1e-5, part
    assert _max_diff(host.params, jax.device_get(_init()).params) > 1e-3  # it trained
    # The state stayed in the layout: sharded kernels, replicated biases.
    wanted = jax.tree.leaves(fsdp.state_shardings(state_f))
    for leaf, want in zip(jax.tree.leaves(state_f), wanted, strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    kernel = state_f.params["params"]["Conv_0"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")


def test_config_mesh_section_is_validated_and_resumable():
    c = config_lib.default_config()
    c.parallel = "fsdp"
    c.mesh.fsdp = 3
    with pytest.raises(UsageError, match=r"mesh.fsdp=3.*must divide the device count=8"):
        config_lib.validate(c, device_count=8)
    c.mesh.fsdp = 4
    config_lib.validate(c, device_count=8)
    c.parallel, c.mesh.fsdp = "shard_map", 3  # the mesh section only matters under fsdp
    config_lib.validate(c, device_count=8)
    c.mesh.fsdp = 0
    with pytest.raises(UsageError, match="mesh.fsdp=0"):
        config_lib.validate(c)
    saved = {"parallel": "fsdp", "mesh": {"fsdp": 8, "fsdp_min_size": 64}}
    given = {"parallel": "shard_map", "mesh": {"fsdp": None, "fsdp_min_size": 16384}}
    conflicts, changes = resume.resume_changes(saved, given)
    assert conflicts == {} and set(changes) == {"parallel", "mesh.fsdp", "mesh.fsdp_min_size"}
