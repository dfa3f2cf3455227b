"""Tests of ddpm_jax.state: optimizer and EMA against float64 NumPy, per-example randomness, and
one training step against a direct computation on the whole global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import losses, schedules, state as st


def test_learning_rate_schedule_linear_warmup():
    lr = st.learning_rate_schedule(2e-4, 4)
    got = np.array([float(lr(s)) for s in range(6)])
    np.testing.assert_allclose(got, 2e-4 * np.minimum(1.0, (np.arange(6) + 1) / 4), rtol=1e-6)
    const = st.learning_rate_schedule(3e-4, 0)
    assert float(const(0)) == pytest.approx(3e-4) and float(const(10**6)) == pytest.approx(3e-4)


def _adam_reference(p, grads, *, lr, warmup, clip, b1=0.9, b2=0.999, eps=1e-8):
    """Clip-by-global-norm then Adam with linear warm-up, in float64."""
    p = np.asarray(p, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for s, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        g = g * min(1.0, clip / np.linalg.norm(g))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (s + 1)), v / (1 - b2 ** (s + 1))
        p = p - lr * min(1.0, (s + 1) / warmup) * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_optimizer_matches_float64_reference():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=5).astype(np.float32)
    # Norms around 0.3 and 3: the clip at 1.0 is active on some steps only.
    grads = [rng.normal(size=5).astype(np.float32) * s for s in (0.15, 1.5, 0.2, 2.0)]
    opt = st.make_optimizer(lr=0.1, warmup_steps=3, grad_clip=1.0)
    params, opt_state = jnp.asarray(p0), opt.init(jnp.asarray(p0))
    for g in grads:
        updates, opt_state = opt.update(jnp.asarray(g), opt_state, params)
        params = optax.apply_updates(params, updates)
    want = _adam_reference(p0, grads, lr=0.1, warmup=3, clip=1.0)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-6)
    # No clipping at all when grad_clip = 0: differs from the clipped run.
    opt = st.make_optimizer(lr=0.1, warmup_steps=3, grad_clip=0.0)
    params, opt_state = jnp.asarray(p0), opt.init(jnp.asarray(p0))
    for g in grads:
        updates, opt_state = opt.update(jnp.asarray(g), opt_state, params)
        params = optax.apply_updates(params, updates)
    want = _adam_reference(p0, grads, lr=0.1, warmup=3, clip=np.inf)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-6)


def test_ema_update_closed_form():
    ema, params, d = {"w": jnp.zeros(3)}, {"w": jnp.full(3, 2.0)}, 0.9
    for _ in range(10):
        ema = st.ema_update(ema, params, d)
    np.testing.assert_allclose(np.asarray(ema["w"]), 2.0 * (1 - d**10), rtol=1e-6)


def test_per_example_randomness_depends_only_on_seed_step_and_index():
    shape, T = (4, 4, 1), 50
    index = jnp.arange(16, dtype=jnp.int32)

    @jax.jit
    def draw(seed, step, idx):
        return st.draw_example_randomness(st.example_keys(seed, step, idx), shape, T, 0.5)

    t, noise, drop = draw(0, 3, index)
    # Split into "devices" of 4 rows each: every example draws the same values.
    for chunk in np.split(np.arange(16), 4):
        tc, nc, dc = draw(0, 3, index[chunk])
        np.testing.assert_array_equal(tc, t[chunk])
        np.testing.assert_array_equal(nc, noise[chunk])
        np.testing.assert_array_equal(dc, drop[chunk])
    # Different examples, steps and seeds draw different noise (a replicated key would not).
    assert len({float(n) for n in noise[:, 0, 0, 0]}) == 16
    assert not np.allclose(draw(0, 4, index)[1], noise)
    assert not np.allclose(draw(1, 3, index)[1], noise)
    # Distributions: t uniform on [0, T), noise standard normal, drop ~ Bernoulli(p).
    big = jnp.arange(4000, dtype=jnp.int32)
    t, noise, drop = jax.jit(
        lambda i: st.draw_example_randomness(st.example_keys(7, 0, i), (2,), T, 0.1)
    )(big)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    assert abs(float(drop.mean()) - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 4000)


NUM_CLASSES = 3


def _apply_fn(params, x_t, t, y=None, rng=None, example_index=None):
    """A model whose output depends on x_t, t and y: w x_t + b[t] + e[y]."""
    out = params["w"] * x_t + params["b"][t][:, None, None, None]
    return out + params["e"][y][:, None, None, None]


def test_train_step_equals_direct_global_batch_computation():
    """Two "devices" (vmap with an axis name) running the per-device step agree with one direct
    computation on the global batch: loss, averaged gradient, Adam update, EMA, label dropout."""
    schedule = schedules.linear(20, beta_start=1e-3, beta_end=0.2)
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.float32(0.5),
        "b": jnp.asarray(rng.normal(size=20), jnp.float32),
        "e": jnp.asarray(rng.normal(size=NUM_CLASSES + 1), jnp.float32),
    }
    opt = st.make_optimizer(lr=1e-2, warmup_steps=2, grad_clip=1.0)
    state = st.create_train_state(params, opt)
    state = state.replace(step=jnp.int32(5))
    B, D = 8, 2
    x0 = jnp.asarray(rng.uniform(-1, 1, (B, 4, 4, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, B), jnp.int32)
    index = jnp.arange(B, dtype=jnp.int32)
    settings = st.StepSettings(seed=3, global_batch_size=B, ema_decay=0.9, p_uncond=0.5)
    step_fn = st.make_train_step(
        _apply_fn,
        schedule,
        opt,
        settings,
        map_grads=st.pmean_grads("data"),
        lr_schedule=st.learning_rate_schedule(1e-2, 2),
        null_label=NUM_CLASSES,
    )
    per_device = lambda a: a.reshape(D, B // D, *a.shape[1:])
    batch = {"image": per_device(x0), "label": per_device(labels), "index": per_device(index)}
    new, metrics = jax.jit(jax.vmap(step_fn, in_axes=(None, 0), axis_name="data"))(state, batch)

    # Direct computation on the global batch.
    t, noise, drop = st.draw_example_randomness(st.example_keys(3, 5, index), (4, 4, 1), 20, 0.5)
    y = jnp.where(drop, NUM_CLASSES, labels)
    assert 0 < int(drop.sum()) < B  # some labels dropped, some kept

    def loss_fn(p):
        return losses.diffusion_loss(
            lambda x, tt, **c: _apply_fn(p, x, tt, **c), schedule, x0, t, noise, cond={"y": y}
        )

    @jax.jit
    def direct(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, _ = opt.update(grads, opt_state, params)
        return loss, optax.tree.norm(grads), optax.apply_updates(params, updates)

    loss, grad_norm, want_params = direct(params, state.opt_state)
    for d in range(D):
        assert float(metrics["loss"][d]) == pytest.approx(float(loss), rel=1e-6)
        assert float(metrics["grad_norm"][d]) == pytest.approx(float(grad_norm), rel=1e-5)
        assert float(metrics["lr"][d]) == pytest.approx(1e-2)
        assert int(new.step[d]) == 6
        for name in params:
            np.testing.assert_allclose(new.params[name][d], want_params[name], rtol=1e-5)
            want_ema = 0.9 * params[name] + 0.1 * want_params[name]
            np.testing.assert_allclose(new.ema_params[name][d], want_ema, rtol=1e-5)


def test_train_step_unconditional_ignores_labels():
    schedule = schedules.linear(20, beta_start=1e-3, beta_end=0.2)
    params = {"w": jnp.float32(0.5), "b": jnp.zeros(20), "e": jnp.zeros(NUM_CLASSES + 1)}
    opt = st.make_optimizer(lr=1e-2, warmup_steps=0)
    state = st.create_train_state(params, opt)
    apply_fn = lambda p, x, t, rng=None, example_index=None: (
        p["w"] * x + p["b"][t][:, None, None, None]
    )
    settings = st.StepSettings(seed=0, global_batch_size=4)
    step_fn = st.make_train_step(
        apply_fn, schedule, opt, settings, map_grads=st.pmean_grads("data")
    )
    batch = {
        "image": jnp.zeros((1, 4, 2, 2, 1)),
        "label": jnp.full((1, 4), -1, jnp.int32),
        "index": jnp.arange(4, dtype=jnp.int32)[None],
    }
    new, metrics = jax.jit(jax.vmap(step_fn, in_axes=(None, 0), axis_name="data"))(state, batch)
    assert np.isfinite(float(metrics["loss"][0])) and "lr" not in metrics
    assert int(new.step[0]) == 1
