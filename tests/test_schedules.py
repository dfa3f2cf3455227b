import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules


def test_linear_alpha_bars_match_independent_float64_product():
    sched = schedules.linear(1000, 1e-4, 0.02)
    expected = []
    prod = 1.0
    for i in range(1000):
        beta = 1e-4 + (0.02 - 1e-4) * i / 999  # plain Python floats, no NumPy
        prod *= 1.0 - beta
        expected.append(prod)
    np.testing.assert_allclose(np.asarray(sched.alpha_bars), expected, rtol=1e-6, atol=1e-6)
    assert sched.num_timesteps == 1000
    assert sched.alpha_bars.dtype == jnp.float32
    # Known values of the DDPM schedule: ᾱ at the last step is ~4.04e-5.
    assert abs(float(sched.alpha_bars[-1]) - 4.0358e-5) < 1e-8


def test_cosine_schedule_matches_its_formula():
    T, s = 1000, 0.008
    sched = schedules.cosine(T, s=s)

    def f(tau):
        return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f((i + 1) / T) / f(0.0) for i in range(T)])
    betas = np.asarray(sched.betas, np.float64)
    unclipped = betas < 0.999 - 1e-6
    assert unclipped[:-1].all()  # only the final step is clipped by max_beta
    np.testing.assert_allclose(
        np.asarray(sched.alpha_bars)[unclipped], expected[unclipped], rtol=1e-5, atol=1e-7
    )
    assert float(sched.betas[-1]) == pytest.approx(0.999)


def test_sigmoid_schedule_matches_its_formula_and_decreases():
    T, start, end, tau = 500, -3.0, 3.0, 0.9
    sched = schedules.sigmoid(T, start=start, end=end, tau=tau)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def ab(u):
        return (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (
            sig(end / tau) - sig(start / tau)
        )

    expected = np.array([ab((i + 1) / T) for i in range(T)])
    got = np.asarray(sched.alpha_bars)
    unclipped = np.asarray(sched.betas) < 0.999 - 1e-6
    np.testing.assert_allclose(got[unclipped], expected[unclipped], rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(got) < 0)


@pytest.mark.parametrize("maker", [schedules.linear, schedules.cosine, schedules.sigmoid])
def test_tables_are_consistent(maker):
    s = maker(200) if maker is not schedules.linear else maker(200, 1e-3, 0.1)
    b = np.asarray(s.betas, np.float64)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    for name in [
        "betas", "alphas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars",
        "sqrt_one_minus_alpha_bars", "sqrt_recip_alpha_bars", "sqrt_recipm1_alpha_bars",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "log_snr",
    ]:  # fmt: skip
        arr = getattr(s, name)
        assert arr.shape == (200,) and arr.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(arr))), name
    np.testing.assert_allclose(s.alpha_bars_prev, ab_prev, rtol=1e-5)
    np.testing.assert_allclose(s.log_snr, np.log(ab / (1 - ab)), rtol=1e-5, atol=1e-5)
    assert float(s.posterior_variance[0]) == 0.0
    assert float(s.posterior_log_variance_clipped[0]) == pytest.approx(
        float(s.posterior_log_variance_clipped[1])
    )


def test_schedule_is_a_pytree_with_static_length():
    s = schedules.linear(10, 1e-3, 0.2)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 13
    s2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert s2.num_timesteps == 10

    @jax.jit
    def last(sched):
        return sched.alpha_bars[sched.num_timesteps - 1]

    assert float(last(s)) == pytest.approx(float(s.alpha_bars[-1]))


def test_validation_errors():
    with pytest.raises(ValueError, match="betas"):
        schedules.from_betas([0.1, 1.2])
    with pytest.raises(ValueError, match="betas"):
        schedules.from_betas(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.linear(0)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get("quadratic")
    with pytest.raises(ValueError, match="start < end"):
        schedules.sigmoid(10, start=3, end=-3)


def test_get_builds_every_name_and_lists_them_when_unknown():
    assert schedules.NAMES == ("linear", "cosine", "sigmoid")
    for name in schedules.NAMES:
        sched = schedules.get(name, 20)
        want = getattr(schedules, name)(20)
        np.testing.assert_array_equal(sched.alpha_bars, want.alpha_bars)
    with pytest.raises(ValueError, match=r"expected one of \('linear', 'cosine', 'sigmoid'\)"):
        schedules.get("quadratic")
