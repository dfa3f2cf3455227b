"""Guidance wrappers: call structure, exact endpoints, no recompiles, and known-answer sampling.

Data for the known answers: a 1-D mixture of two Gaussians N(M_k, S_k²) with weights W, whose
exact noise predictor (per component and for the mixture) and exact noisy posterior
p(k | x_t) are closed forms. Guiding the mixture toward component k with the exact posterior and
scale 1 must give exactly component k's distribution; larger scales concentrate further.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ddpm_jax import diffusion, guidance, schedules
from ddpm_jax.samplers import sample

SCHED = schedules.linear(1000)
W, M, S = np.array([0.2, 0.8]), np.array([-1.0, 1.0]), np.array([0.6, 0.6])


def _component_terms(x, t):
    """Per-component log N(x_t; √ᾱ M_k, ᾱ S_k² + 1 - ᾱ) and E_k[ε | x_t]; x: [B, 1] -> [B, K]."""
    ab = SCHED.alpha_bars[t][:, None]
    var = ab * S**2 + 1 - ab
    log_n = -0.5 * jnp.log(var) - 0.5 * (x - jnp.sqrt(ab) * M) ** 2 / var
    return log_n, jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * M) / var


def log_posterior(x, t):
    """log p(k | x_t) for the mixture, [B, K]."""
    log_n, _ = _component_terms(x, t)
    return jax.nn.log_softmax(jnp.log(W) + log_n, axis=-1)


def mixture_eps(x, t, **_):
    """E[ε | x_t] of the mixture (the unconditional model); ignores conditioning."""
    _, eps_k = _component_terms(x, t)
    return jnp.sum(jnp.exp(log_posterior(x, t)) * eps_k, axis=-1, keepdims=True)


def class_eps(x, t, y):
    """E[ε | x_t, y] with y in {0, 1} the component and y = 2 the null label (the mixture)."""
    _, eps_k = _component_terms(x, t)
    cond = jnp.take_along_axis(eps_k, jnp.minimum(y, 1)[:, None], axis=1)
    return jnp.where((y == 2)[:, None], mixture_eps(x, t), cond)


def class_log_prob(x, t, y):
    """log p(y | x_t, t) from the exact posterior: a perfect noisy classifier, [B]."""
    return jnp.take_along_axis(log_posterior(x, t), y[:, None], axis=1)[:, 0]


# ------------------------------------------------------------------------- classifier-free


def test_cfg_is_one_batched_call_with_null_conditioning():
    calls = []

    def model_fn(x, t, y, context):
        calls.append((x.shape, t.shape, y, context))
        return x * (1.0 + y[:, None]) + context.sum(axis=(1, 2))[:, None]

    null_ctx = jnp.full((1, 2, 3), -1.0)
    guided = guidance.classifier_free(model_fn, 3.0, null_label=10, null_cond={"context": null_ctx})
    x = jnp.arange(8.0).reshape(4, 2)
    y, ctx = jnp.array([1, 2, 3, 4]), jnp.ones((4, 2, 3))
    t = jnp.full((4,), 7)
    out = guided(x, t, y=y, context=ctx)
    assert len(calls) == 1
    (x_shape, t_shape, y_both, ctx_both) = calls[0]
    assert x_shape == (8, 2) and t_shape == (8,)
    np.testing.assert_array_equal(y_both, [1, 2, 3, 4, 10, 10, 10, 10])
    np.testing.assert_array_equal(ctx_both[:4], ctx)
    np.testing.assert_array_equal(ctx_both[4:], jnp.broadcast_to(null_ctx, (4, 2, 3)))
    cond = model_fn(x, t, y, ctx)
    uncond = model_fn(x, t, jnp.full((4,), 10), jnp.broadcast_to(null_ctx, (4, 2, 3)))
    np.testing.assert_allclose(out, uncond + 3.0 * (cond - uncond), rtol=1e-6)


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    key = jax.random.PRNGKey(0)
    x, t = jax.random.normal(key, (6, 1)), jnp.array([0, 10, 100, 500, 900, 999])
    y = jnp.array([0, 1, 0, 1, 0, 1])
    cond, uncond = class_eps(x, t, y), class_eps(x, t, jnp.full((6,), 2))
    for scale, want in ((1.0, cond), (0.0, uncond)):
        got = jax.jit(lambda s: guidance.classifier_free(class_eps, s, 2)(x, t, y=y))(scale)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Ho & Salimans: (1 + w) ε_c - w ε_∅ with w = guidance_scale - 1.
    w = 2.5
    got = guidance.classifier_free(class_eps, 1 + w, 2)(x, t, y=y)
    np.testing.assert_allclose(got, (1 + w) * cond - w * uncond, rtol=1e-5, atol=1e-6)


def test_cfg_errors_name_the_problem():
    guided = guidance.classifier_free(class_eps, 2.0, null_label=2)
    x, t = jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="conditioning"):
        guided(x, t)
    with pytest.raises(ValueError, match="context"):
        guided(x, t, y=jnp.zeros((2,), jnp.int32), context=jnp.zeros((2, 3, 4)))


def test_cfg_sampling_guidance_scale_is_traced_and_scale_one_is_the_class():
    """One compile for every scale; s = 1 samples class 0 exactly, s = 0 the mixture."""
    n = 20000
    y = jnp.zeros((n,), jnp.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(scale):
        guided = guidance.classifier_free(class_eps, scale, null_label=2)
        model_fn = functools.partial(guided, y=y)
        return sample(model_fn, SCHED, jax.random.PRNGKey(1), (n, 1), method="dpmpp_2m",
                      num_steps=25)[:, 0]  # fmt: skip

    x1, x0, x3 = (np.asarray(run(s), np.float64) for s in (1.0, 0.0, 3.0))
    # Class 0 is N(-1, 0.36): 5 standard errors + the sampler's bias at 25 steps (< 0.02).
    assert abs(x1.mean() + 1.0) < 5 * 0.6 / np.sqrt(n) + 0.02
    assert abs(x1.var() - 0.36) < 5 * 0.36 * np.sqrt(2 / n) + 0.02
    frac0 = lambda x: np.mean(x < 0)
    want_mix = float(np.sum(W * norm.cdf(-M / S)))
    assert abs(frac0(x0) - want_mix) < 5 * np.sqrt(want_mix * (1 - want_mix) / n) + 0.01
    assert frac0(x3) > frac0(x1) > frac0(x0)


# -------------------------------------------------------------------------------- classifier


def test_classifier_guidance_shift_is_the_scaled_gradient():
    """For log p(y | x) = a·x (gradient a) the shift is exactly -√(1-ᾱ_t) s a, in every param."""
    a = jnp.array([0.5, -2.0, 1.0])
    log_prob_fn = lambda x, t, **_: x @ a
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    t = jnp.array([0, 3, 300, 999])
    eps = mixture_eps(x[:, :1], t) * jnp.ones((1, 3))
    model = lambda x, t: eps
    shift = -SCHED.sqrt_one_minus_alpha_bars[t][:, None] * 2.0 * a
    got = guidance.classifier(model, log_prob_fn, 2.0, SCHED)(x, t)
    np.testing.assert_allclose(got, eps + shift, rtol=1e-6, atol=1e-6)
    # The same guidance through an x0- or v-predicting model converts back to the same ε̃.
    x0 = diffusion.predict_x0_from_eps(SCHED, x, t, eps)
    v = diffusion.predict_v(SCHED, x0, t, eps)
    for pred, out in (("x0", x0), ("v", v)):
        g = guidance.classifier(lambda x, t, o=out: o, log_prob_fn, 2.0, SCHED, prediction=pred)
        _, eps_guided = diffusion.predict_x0_and_eps(SCHED, g(x, t), x, t, pred)
        np.testing.assert_allclose(eps_guided, eps + shift, rtol=1e-3, atol=1e-3, err_msg=pred)


def test_classifier_guidance_steers_into_the_requested_component():
    """Known answer: with the exact posterior, scale 1 samples component 0 exactly (it holds 20% of
    the mass unguided); larger scales put more of the samples there and tighten them."""
    n = 20000
    y = jnp.zeros((n,), jnp.int32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(scale):
        guided = guidance.classifier(mixture_eps, class_log_prob, scale, SCHED)
        return sample(functools.partial(guided, y=y), SCHED, jax.random.PRNGKey(3), (n, 1),
                      method="dpmpp_2m", num_steps=25)[:, 0]  # fmt: skip

    fracs, stds = [], []
    for scale in (0.0, 1.0, 1.5, 3.0):
        x = np.asarray(run(scale), np.float64)
        fracs.append(np.mean(x < 0))
        stds.append(x.std())
        if scale == 0.0:  # the unguided mixture
            want = float(np.sum(W * norm.cdf(-M / S)))
        elif scale == 1.0:  # exactly component 0, N(-1, 0.6²)
            want = float(norm.cdf(1.0 / 0.6))
            assert abs(x.mean() + 1.0) < 5 * 0.6 / np.sqrt(n) + 0.02
            assert abs(x.var() - 0.36) < 5 * 0.36 * np.sqrt(2 / n) + 0.02
        else:
            continue
        assert abs(fracs[-1] - want) < 5 * np.sqrt(want * (1 - want) / n) + 0.01, (scale, fracs)
    # Measured (20k samples): fractions 0.24, 0.948, 0.9993, 1.0; std 1.02, 0.61, 0.47, 0.37.
    assert fracs[0] < fracs[1] < fracs[2] <= fracs[3] and fracs[2] > 0.99, fracs
    assert stds[0] > stds[1] > stds[2] > stds[3], stds


def test_wrapper_argument_errors_name_the_problem():
    """Shape mistakes raise ValueError when the guided function is called (while tracing)."""
    cfg = guidance.classifier_free(class_eps, 2.0, null_label=2)
    x, t, y = jnp.zeros((4, 1)), jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"classifier_free: t must be \[B\] = \(4,\) or a scalar"):
        cfg(x, t[:3], y=y)
    with pytest.raises(ValueError, match=r"conditioning 'y' must be \[B, \.\.\.\] with B = 4"):
        cfg(x, t, y=y[:2])
    with pytest.raises(ValueError, match=r"classifier_free: x_t must be \[B, \.\.\.\]"):
        cfg(jnp.zeros((4,)), t, y=y)
    ctx_cfg = guidance.classifier_free(
        lambda x, t, context: x, 2.0, null_cond={"context": jnp.zeros((3, 5))}
    )
    with pytest.raises(ValueError, match=r"null value of 'context', shape \(3, 5\), does not"):
        ctx_cfg(x, t, context=jnp.zeros((4, 2, 8)))
    clf = guidance.classifier(mixture_eps, class_log_prob, 1.0, SCHED)
    with pytest.raises(
        ValueError, match=r"classifier: t must be int32 \[B\] = \(4,\), got float32"
    ):
        clf(x, jnp.zeros((4,)), y=y)
    wrong = guidance.classifier(lambda x, t, **_: x[:, None], class_log_prob, 1.0, SCHED)
    with pytest.raises(ValueError, match=r"must return an array shaped like x_t \(4, 1\)"):
        wrong(x, t, y=y)
