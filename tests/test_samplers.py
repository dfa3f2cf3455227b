"""Samplers driven by the exact noise predictor of Gaussian and mixture data (no training).

For x_0 ~ N(μ, diag(s²)) the optimal predictor is affine in x_t:
E[x_0 | x_t] = μ + √ᾱ s² (x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ), so every sampler is an affine map of x_T
plus Gaussian noise. A float64 NumPy reference written independently from the papers' update rules
propagates that map exactly (``_reference``): it gives the output distribution of each method with
no sampling error, which (1) must match the JAX samplers (pathwise for the deterministic ones,
within 5 standard errors of the moments for the stochastic ones), and (2) must converge to the data
distribution as ``num_steps`` grows — the discretisation error, measured with no noise.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules
from ddpm_jax.samplers import DEFAULT_SPACINGS, METHODS, SPACINGS, plan, sample, step, timesteps

SCHED = schedules.linear(1000)
# The documented way to run a sampler: under jax.jit, one compile per static configuration.
jit_sample = jax.jit(
    sample,
    static_argnums=(0, 3),
    static_argnames=("method", "num_steps", "prediction", "clip_x0", "timestep_spacing",
                     "variance", "return_trajectory"),
)  # fmt: skip
BETAS = np.linspace(1e-4, 0.02, 1000)  # float64 copy of SCHED for the references
AB = np.cumprod(1 - BETAS)
MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.5, 1.0, 0.2, 1.5])


def gaussian_eps(x, t):
    """E[ε | x_t] for x_0 ~ N(MU, diag(SD²)): √(1-ᾱ)(x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)."""
    ab = SCHED.alpha_bars[t][:, None]
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SD**2 + 1 - ab)


def marginal(t):
    """Mean and variance of q(x_t) for the Gaussian data (float64 [4] each)."""
    return np.sqrt(AB[t]) * MU, AB[t] * SD**2 + 1 - AB[t]


def exact_x_T(key, n, t0):
    m, v = marginal(t0)
    return jnp.asarray(m + np.sqrt(v) * np.asarray(jax.random.normal(key, (n, 4))), jnp.float32)


# ---------------------------------------------------------------- float64 reference (affine maps)
# A state is an array L [3, 4]: x = L[0] + L[1] x_T + L[2] z with z ~ N(0, I) independent of x_T.
# Every update is affine with one coefficient per dimension, so the accumulated noise stays one
# Gaussian term: a new draw std * z' merges into L[2] = √(L[2]² + std²).


def _x0_hat(L, t):
    ab = AB[t]
    p = np.sqrt(ab) * SD**2 / (ab * SD**2 + 1 - ab)
    out = p * L
    out[0] += MU * (1 - p * np.sqrt(ab))
    return out


def _eps_hat(L, t):
    return (L - np.sqrt(AB[t]) * _x0_hat(L, t)) / np.sqrt(1 - AB[t])


def _add_noise(L, std):
    L = L.copy()
    L[2] = np.sqrt(L[2] ** 2 + std**2)
    return L


def _reference(method, grid, *, eta=0.0, variance="fixed_small"):
    """Output distribution of ``method`` on ``grid`` with x_T ~ q(x_{t_0}): (mean, var) [4]."""
    L = np.zeros((3, 4))
    L[1] = 1.0
    prev_x0 = None
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        a_t, a_s = AB[t], AB[s]
        x0, eps = _x0_hat(L, t), _eps_hat(L, t)
        if method == "ddim":  # Song et al. Eq. 12 and 16
            sig = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
            L = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sig**2) * eps
            L = _add_noise(L, sig)
        elif method == "ddpm":  # Ho et al. Eq. 7 with the respaced beta = 1 - ab_t / ab_s
            beta = 1 - a_t / a_s
            mean = (beta * np.sqrt(a_s) * x0 + (1 - a_s) * np.sqrt(1 - beta) * L) / (1 - a_t)
            var = beta * (1 - a_s) / (1 - a_t) if variance == "fixed_small" else beta
            L = _add_noise(mean, np.sqrt(var))
        elif method == "dpmpp_2m":  # Lu et al. 2022, Algorithm 2 (VP form)
            lam = lambda u: 0.5 * np.log(AB[u] / (1 - AB[u]))
            h = lam(s) - lam(t)
            if prev_x0 is None:
                d = x0
            else:
                r = (lam(t) - lam(grid[i - 1])) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            L = np.sqrt((1 - a_s) / (1 - a_t)) * L - np.sqrt(a_s) * np.expm1(-h) * d
            prev_x0 = x0
        else:  # heun: Karras et al. Algorithm 1 on x~ = x / sqrt(ab), sigma = sqrt((1-ab)/ab)
            sig_t, sig_s = np.sqrt((1 - a_t) / a_t), np.sqrt((1 - a_s) / a_s)
            xt = L / np.sqrt(a_t)
            xe = xt + (sig_s - sig_t) * eps
            eps2 = _eps_hat(np.sqrt(a_s) * xe, s)
            L = np.sqrt(a_s) * (xt + (sig_s - sig_t) * 0.5 * (eps + eps2))
    out = _x0_hat(L, 0)  # the final step to clean data
    m_T, v_T = marginal(grid[0])
    return out[0] + out[1] * m_T, out[1] ** 2 * v_T + out[2] ** 2, out


def assert_within(got, want, tol, what=""):
    """|got - want| <= tol elementwise (tol may be an array, unlike assert_allclose's atol)."""
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= tol), f"{what}: |got - want| = {err} > tol = {tol}"


def _np_grid(n, spacing):
    """The sampling grid in float64 NumPy, written from the definitions (see samplers.timesteps)."""
    i = np.arange(n)
    if spacing == "uniform":
        return list(i * 1000 // n)[::-1]
    lam = np.log(AB / (1 - AB))
    if spacing == "logsnr":
        targets = np.linspace(lam[0], lam[-1], n)
    else:  # karras, rho = 7, in sigma = sqrt((1 - ab) / ab) = exp(-lam / 2)
        lo, hi = np.exp(-lam[0] / 14), np.exp(-lam[-1] / 14)
        targets = -14 * np.log(lo + np.linspace(0, 1, n) * (hi - lo))
    u = [0]
    for x in targets[1:]:  # nearest timestep in lambda, moved past the previous one if taken
        u.append(max(int(np.argmin(np.abs(lam - x))), u[-1] + 1))
    assert u[-1] <= 999
    return u[::-1]


def _grid(method, n):
    return _np_grid(n, DEFAULT_SPACINGS[method])


def _rel_error(method, n):
    mean, var, _ = _reference(method, _grid(method, n))
    return max(np.max(np.abs(mean - MU) / SD), np.max(np.abs(var / SD**2 - 1)))


# ----------------------------------------------------------------------------------- grids


def test_timestep_grids_known_values():
    np.testing.assert_array_equal(timesteps(SCHED, 10, "uniform"), np.arange(900, -1, -100))
    quad = (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)[::-1]  # DDIM's CIFAR-10 grid
    np.testing.assert_array_equal(timesteps(SCHED, 10, "quadratic"), quad)
    np.testing.assert_array_equal(timesteps(SCHED, 4, "trailing"), [999, 666, 333, 0])
    for n in (2, 8, 25, 100, 500):
        for spacing in ("uniform", "logsnr", "karras"):
            np.testing.assert_array_equal(timesteps(SCHED, n, spacing), _np_grid(n, spacing))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timestep_grids_are_strictly_decreasing_and_end_at_zero(spacing):
    for sched, sizes in ((SCHED, (2, 100, 999, 1000)), (schedules.cosine(50), (3, 50))):
        T = sched.num_timesteps
        for n in sizes:
            g = np.asarray(timesteps(sched, n, spacing))
            assert g.dtype == np.int32 and g.shape == (n,)
            assert g[-1] == 0 and g[0] <= T - 1 and np.all(np.diff(g) < 0), (spacing, T, n, g)
            if spacing in ("trailing", "logsnr", "karras"):
                assert g[0] == T - 1
        np.testing.assert_array_equal(timesteps(sched, T, spacing), np.arange(T)[::-1])


def test_grid_with_crowded_points_moves_duplicates_up():
    g = np.asarray(timesteps(SCHED, 100, "logsnr"))  # λ-uniform points crowd near t = 0
    np.testing.assert_array_equal(g[-15:], np.arange(14, -1, -1))
    assert g[0] == 999 and len(set(g.tolist())) == 100
    quad = np.asarray(timesteps(SCHED, 100, "quadratic"))  # DDIM's int() would repeat 0 four times
    np.testing.assert_array_equal(quad[-4:], [3, 2, 1, 0])


# ---------------------------------------------------------- exact known answers, float64 reference


def x0_model(x, t):
    ab = SCHED.alpha_bars[t][:, None]
    return (x - jnp.sqrt(1 - ab) * gaussian_eps(x, t)) / jnp.sqrt(ab)


def v_model(x, t):
    ab = SCHED.alpha_bars[t][:, None]
    return jnp.sqrt(ab) * gaussian_eps(x, t) - jnp.sqrt(1 - ab) * x0_model(x, t)


@pytest.mark.parametrize(
    "method,num_steps,prediction",
    [("ddim", 4, "eps"), ("ddim", 25, "x0"), ("dpmpp_2m", 4, "v"), ("dpmpp_2m", 25, "eps"),
     ("heun", 4, "x0"), ("heun", 25, "eps")],
)  # fmt: skip
def test_deterministic_solvers_equal_float64_reference(method, num_steps, prediction):
    """The output is the reference's affine map of x_T, pathwise (x_T at -3, 0, +3 std), for
    every parametrization of the exact model."""
    model_fn = {"eps": gaussian_eps, "x0": x0_model, "v": v_model}[prediction]
    grid = _grid(method, num_steps)
    m_T, v_T = marginal(grid[0])
    x_T = jnp.asarray(m_T + np.sqrt(v_T) * np.array([[-3.0], [0.0], [3.0]]), jnp.float32)
    got = jit_sample(model_fn, SCHED, jax.random.PRNGKey(0), (3, 4), method=method,
                     num_steps=num_steps, prediction=prediction, x_T=x_T)  # fmt: skip
    _, _, L = _reference(method, grid)
    want = L[0] + L[1] * np.asarray(x_T, np.float64)
    np.testing.assert_allclose(got, want, rtol=3e-4, atol=3e-4)


# Discretisation error of each method at the step count used below: max over the 4 dimensions of
# |Δmean|/s and |var/s² - 1| of the exact float64 output distribution (test_discretisation_...
# checks these bounds). The worst dimension is always s = 0.2, where x̂_0 changes fastest near t = 0.
BIAS = {("ddim", 500): 0.03, ("ddpm", 1000): 0.04, ("dpmpp_2m", 25): 0.022, ("heun", 40): 0.03}


@pytest.mark.parametrize("method,num_steps", [("ddim", 500), ("dpmpp_2m", 25), ("heun", 40)])
def test_reproduces_gaussian_data(method, num_steps):
    """Sample mean and variance equal the data's within 5 standard errors + the stated bias."""
    n = 40000
    grid = _grid(method, num_steps)
    x_T = exact_x_T(jax.random.PRNGKey(1), n, grid[0])
    x = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(2), (n, 4), method=method,
                   num_steps=num_steps, x_T=x_T)  # fmt: skip
    x = np.asarray(x, np.float64)
    ref_mean, ref_var, _ = _reference(method, grid)
    se_mean, se_var = np.sqrt(ref_var / n), ref_var * np.sqrt(2 / n)
    # (1) the implementation: sample moments equal the exact float64 output moments.
    assert_within(x.mean(0), ref_mean, 5 * se_mean + 1e-4, "mean vs reference")
    assert_within(x.var(0), ref_var, 5 * se_var + 1e-4, "var vs reference")
    # (2) the data: within sampling error plus the stated discretisation bias.
    tol = BIAS[method, num_steps]
    assert_within(x.mean(0), MU, 5 * se_mean + tol * SD, "mean vs data")
    assert_within(x.var(0), SD**2, 5 * se_var + tol * SD**2, "var vs data")


def test_discretisation_error_shrinks():
    """Exact (noise-free) output moments converge to the data as num_steps grows."""
    for (method, n), bound in BIAS.items():
        assert _rel_error(method, n) < bound, (method, n)
    measured = {}
    for method in METHODS:
        steps = (10, 50, 250) if method in ("ddim", "ddpm") else (10, 20, 40, 80)
        errs = [_rel_error(method, n) for n in steps]
        assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), (method, errs)
        measured[method] = dict(zip(steps, errs, strict=True))
    # Second order for DPM-Solver++(2M) and Heun (4x the steps: > 8x smaller error), first order
    # for DDIM and DDPM (5x the steps: < 8x smaller error). Beyond ~100 steps the λ / Karras grids
    # run out of distinct timesteps near t = 0 and the error levels off near 1e-3.
    for method in ("dpmpp_2m", "heun"):
        assert measured[method][80] < measured[method][20] / 8, measured[method]
    for method in ("ddim", "ddpm"):
        assert measured[method][250] > measured[method][50] / 8, measured[method]


def test_ddpm_full_grid_is_ho_et_al_algorithm_2():
    """num_steps = T: the scan is x_{t-1} = μ_θ(x_t, t) + σ_t z (z = 0 at t = 0), step by step."""
    from ddpm_jax import diffusion

    key, x_T = jax.random.PRNGKey(3), jax.random.normal(jax.random.PRNGKey(4), (16, 4))
    got = jit_sample(gaussian_eps, SCHED, key, (16, 4), method="ddpm", num_steps=1000, x_T=x_T)
    step_keys = jax.random.split(jax.random.split(key)[1], 999)  # the sampler's noise keys

    def algorithm_2(x, inputs):
        t, k = inputs
        tb = jnp.full((16,), t)
        out = diffusion.p_mean_variance(SCHED, gaussian_eps(x, tb), x, tb)
        noise = jnp.where(t > 0, 1.0, 0.0) * jax.random.normal(k, x.shape)
        return out.mean + jnp.exp(0.5 * out.log_variance) * noise, None

    ts = jnp.arange(999, -1, -1)
    keys = jnp.concatenate([step_keys, step_keys[:1]])
    want, _ = jax.jit(lambda x: jax.lax.scan(algorithm_2, x, (ts, keys)))(x_T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_eta1_full_grid_equals_ddpm_fixed_small_and_the_data():
    """Same noise: DDIM(η=1) and DDPM(β̃) on the full grid agree pathwise, hence in distribution,
    and both reproduce the data within 5 SE + the stated DDPM bias. (8,000 paths of 1,000 steps:
    the tests compile at LLVM -O0, conftest.py, where the random draws are slow.)"""
    n = 8000
    x_T = exact_x_T(jax.random.PRNGKey(5), n, 999)
    kw = dict(num_steps=1000, timestep_spacing="trailing", x_T=x_T)
    ddim = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(6), (n, 4), method="ddim", eta=1.0,
                      **kw)  # fmt: skip
    ddpm = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(6), (n, 4), method="ddpm", **kw)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-3)
    ref_mean, ref_var, _ = _reference("ddpm", list(range(999, -1, -1)))
    se_mean, se_var = np.sqrt(ref_var / n), ref_var * np.sqrt(2 / n)
    for x in (np.asarray(ddim, np.float64), np.asarray(ddpm, np.float64)):
        assert_within(x.mean(0), ref_mean, 5 * se_mean, "mean")
        assert_within(x.var(0), ref_var, 5 * se_var, "var")
        assert_within(x.var(0), SD**2, 5 * se_var + BIAS["ddpm", 1000] * SD**2, "var vs data")


@pytest.mark.parametrize(
    "method,kwargs",
    [("ddpm", {}), ("ddpm", {"variance": "fixed_large"}), ("ddim", {"eta": 0.5})],
)
def test_stochastic_samplers_match_reference_moments(method, kwargs):
    """Respaced (50 steps) stochastic samplers: moments equal the float64 reference within 5 SE."""
    n = 40000
    grid = _grid(method, 50)
    x_T = exact_x_T(jax.random.PRNGKey(7), n, grid[0])
    x = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(8), (n, 4), method=method,
                   num_steps=50, x_T=x_T, **kwargs)  # fmt: skip
    x = np.asarray(x, np.float64)
    ref_mean, ref_var, _ = _reference(method, grid, **kwargs)
    assert_within(x.mean(0), ref_mean, 5 * np.sqrt(ref_var / n), "mean")
    assert_within(x.var(0), ref_var, 5 * ref_var * np.sqrt(2 / n), "var")


def test_dpmpp_2m_first_step_is_ddim():
    """With two grid points DPM-Solver++(2M) takes one first-order step: DDIM(η=0) exactly."""
    x_T = jax.random.normal(jax.random.PRNGKey(9), (8, 4))
    kw = dict(num_steps=2, timestep_spacing="logsnr", x_T=x_T)
    a = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(0), (8, 4), method="dpmpp_2m", **kw)
    b = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(0), (8, 4), method="ddim", **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- mixture of Gaussians
W, M, S = np.array([0.2, 0.8]), np.array([-1.5, 1.0]), np.array([0.3, 0.5])


def mixture_eps(x, t):
    """E[ε | x_t] = Σ_k r_k(x_t) E_k[ε | x_t] for the mixture Σ_k W_k N(M_k, S_k²); x: [B, 1]."""
    ab = SCHED.alpha_bars[t][:, None]
    var = ab * S**2 + 1 - ab  # [B, K]
    logp = jnp.log(W) - 0.5 * jnp.log(var) - 0.5 * (x - jnp.sqrt(ab) * M) ** 2 / var
    r = jax.nn.softmax(logp, axis=-1)
    return jnp.sum(r * jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * M) / var, axis=-1, keepdims=True)


def _mixture_stats():
    from scipy.stats import norm

    mid = M.mean()
    weight0 = float(np.sum(W * norm.cdf((mid - M) / S)))  # P(closer to M[0] than to M[1])
    mean = float(np.sum(W * M))
    var = float(np.sum(W * (S**2 + M**2)) - mean**2)
    return mid, weight0, mean, var


@pytest.mark.parametrize(
    "method,num_steps", [("ddpm", 200), ("ddim", 100), ("dpmpp_2m", 25), ("heun", 40)]
)
def test_reproduces_mixture_weights_and_moments(method, num_steps):
    """Mixture weight (fraction nearer each mean), mean and variance within 5 SE + a bias.

    Bias allowances 0.01 (weight), 0.02 (mean), 0.035 (variance): the largest discretisation
    errors measured at these step counts with 10^5 samples were 0.002, 0.007 and 0.025.
    """
    n = 40000
    mid, weight0, mean, var = _mixture_stats()
    x = jit_sample(mixture_eps, SCHED, jax.random.PRNGKey(10), (n, 1), method=method,
                   num_steps=num_steps)[:, 0]  # fmt: skip
    x = np.asarray(x, np.float64)
    frac0 = np.mean(x < mid)
    se_w = np.sqrt(weight0 * (1 - weight0) / n)
    se_var = np.sqrt((np.mean((x - x.mean()) ** 4) - x.var() ** 2) / n)
    assert abs(frac0 - weight0) < 5 * se_w + 0.01, (frac0, weight0)
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n) + 0.02, (x.mean(), mean)
    assert abs(x.var() - var) < 5 * se_var + 0.035, (x.var(), var)


# ------------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("method", METHODS)
def test_model_evaluations_per_sample(method):
    """DDPM/DDIM/DPM-Solver++(2M): num_steps calls; Heun: 2*num_steps - 1, at the grid points."""
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda tt: calls.append(np.asarray(tt).copy()), t, ordered=True)
        return gaussian_eps(x, t)

    n = 5
    jax.block_until_ready(sample(model_fn, SCHED, jax.random.PRNGKey(0), (3, 4), method=method,
                                 num_steps=n))  # fmt: skip
    jax.effects_barrier()
    grid = _grid(method, n)
    want = grid
    if method == "heun":  # step i evaluates t_i and t_{i+1}; then the final Euler step at t = 0
        want = [t for i in range(n - 1) for t in (grid[i], grid[i + 1])] + [0]
    assert len(calls) == (2 * n - 1 if method == "heun" else n)
    assert [int(c[0]) for c in calls] == want
    assert all(c.shape == (3,) and c.dtype == np.int32 and np.all(c == c[0]) for c in calls)


def test_eta_and_schedule_are_traced_no_recompile():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(sched, key, eta):
        return sample(gaussian_eps, sched, key, (4, 4), method="ddim", num_steps=5, eta=eta)

    outs = [run(SCHED, jax.random.PRNGKey(0), eta) for eta in (0.0, 0.5, 1.0)]
    run(schedules.linear(1000, 2e-4, 0.03), jax.random.PRNGKey(1), 0.3)
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_ddim_eta0_is_deterministic_given_x_T():
    x_T = jax.random.normal(jax.random.PRNGKey(11), (6, 4))
    run = jax.jit(lambda k: sample(gaussian_eps, SCHED, k, (6, 4), num_steps=10, x_T=x_T))
    np.testing.assert_array_equal(run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1)))
    stochastic = jax.jit(
        lambda k: sample(gaussian_eps, SCHED, k, (6, 4), num_steps=10, eta=1.0, x_T=x_T)
    )
    assert not np.allclose(stochastic(jax.random.PRNGKey(0)), stochastic(jax.random.PRNGKey(1)))


def test_clip_x0_and_trajectory():
    x_T = jax.random.normal(jax.random.PRNGKey(13), (64, 4))
    x, traj = jit_sample(gaussian_eps, SCHED, jax.random.PRNGKey(0), (64, 4), num_steps=6,
                         clip_x0=1.0, return_trajectory=True, x_T=x_T)  # fmt: skip
    assert float(jnp.abs(x).max()) <= 1.0 and float(jnp.mean(x[:, 3] == 1.0)) > 0.2  # μ_3 = 2
    assert traj.shape == (7, 64, 4)
    np.testing.assert_array_equal(traj[0], x_T)
    np.testing.assert_array_equal(traj[-1], x)


def test_any_data_shape():
    """Images [B, H, W, C] of i.i.d. N(0.3, 0.5²) pixels (other tests use [B, D] signals)."""
    shape = (64, 4, 4, 3)

    def eps_fn(x, t):
        ab = SCHED.alpha_bars[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * 0.3) / (ab * 0.25 + 1 - ab)

    x = jit_sample(eps_fn, SCHED, jax.random.PRNGKey(14), shape, method="dpmpp_2m", num_steps=20)
    assert x.shape == shape and x.dtype == jnp.float32
    n = x.size
    assert abs(float(x.mean()) - 0.3) < 5 * 0.5 / np.sqrt(n) + 0.01
    assert abs(float(x.var()) - 0.25) < 5 * 0.25 * np.sqrt(2 / n) + 0.035 * 0.25


def test_batch_sharded_over_devices_gives_the_same_samples():
    devices = np.array(jax.devices())
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(devices, ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    x_T = jax.random.normal(jax.random.PRNGKey(15), (64, 4))
    run = jax.jit(lambda k, x: sample(gaussian_eps, SCHED, k, (64, 4), method="ddpm",
                                      num_steps=20, x_T=x))  # fmt: skip
    want = run(jax.random.PRNGKey(0), x_T)
    got = run(jax.random.PRNGKey(0), jax.device_put(x_T, sharding))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_validation_errors_name_the_argument():
    def call(**kw):
        args = dict(method="ddim", num_steps=10)
        args.update(kw)
        shape = args.pop("shape", (2, 4))
        return sample(gaussian_eps, SCHED, jax.random.PRNGKey(0), shape, **args)

    for kw, field in [
        (dict(method="euler"), "method"),
        (dict(timestep_spacing="linear"), "timestep_spacing"),
        (dict(num_steps=1), "num_steps"),
        (dict(num_steps=1001), "num_steps"),
        (dict(num_steps=10.0), "num_steps"),
        (dict(prediction="score"), "prediction"),
        (dict(variance="learned"), "variance"),
        (dict(shape=[2, 4]), "shape"),
        (dict(x_T=jnp.zeros((3, 4))), "x_T"),
        (dict(eta=-1.0), "eta"),
        (dict(method="heun", eta=1.0), "eta"),
        (dict(clip_x0=0.0), "clip_x0"),
    ]:
        with pytest.raises(ValueError, match=field):
            call(**kw)
    with pytest.raises(ValueError, match="timestep_spacing"):
        timesteps(SCHED, 10, "cosine")


class StepTest(chex.TestCase):
    """One scan step against its update rule in float64 NumPy, eager and under jax.jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_one_step_equals_float64_update_rule(self):
        x = jax.random.normal(jax.random.PRNGKey(20), (5, 4))
        x64 = np.asarray(x, np.float64)
        for method in ("ddim", "ddpm"):
            p = plan(SCHED, jax.random.PRNGKey(21), (5, 4), method=method, num_steps=10)
            xs_i = {k: v[3] for k, v in p.xs.items()}  # the step 600 -> 500 of the uniform grid
            t, s = int(xs_i["t"]), int(xs_i["s"])
            assert (t, s) == (600, 500)
            run = self.variant(
                lambda carry, xs_i, m=method: step(gaussian_eps, SCHED, carry, xs_i, method=m)
            )
            (carry_x, _), x_s = run((x, None), xs_i)
            chex.assert_shape(x_s, (5, 4))
            chex.assert_type(x_s, jnp.float32)
            np.testing.assert_array_equal(carry_x, x_s)
            a_t, a_s = AB[t], AB[s]
            x0 = MU + np.sqrt(a_t) * SD**2 * (x64 - np.sqrt(a_t) * MU) / (a_t * SD**2 + 1 - a_t)
            eps = (x64 - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            if method == "ddim":  # Song et al. Eq. 12 with η = 0
                want = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
            else:  # Ho et al. Eq. 7 with the respaced β = 1 - ᾱ_t / ᾱ_s, plus σ z
                beta = 1 - a_t / a_s
                z = np.asarray(jax.random.normal(xs_i["key"], (5, 4)), np.float64)
                mean = (beta * np.sqrt(a_s) * x0 + (1 - a_s) * np.sqrt(1 - beta) * x64) / (1 - a_t)
                want = mean + np.sqrt(beta * (1 - a_s) / (1 - a_t)) * z
            np.testing.assert_allclose(x_s, want, rtol=1e-4, atol=1e-4, err_msg=method)


def test_wrong_model_output_and_data_shapes_give_clear_errors():
    key = jax.random.PRNGKey(0)
    with pytest.raises(
        ValueError,
        match=r"model_fn\(x_t, t\) must return an array shaped like x_t \(2, 4\), got \(2, 1\)",
    ):
        sample(lambda x, t: x[:, :1], SCHED, key, (2, 4), num_steps=3)
    with pytest.raises(
        ValueError, match=r"shape must be .* at least one axis after the batch axis"
    ):
        sample(gaussian_eps, SCHED, key, (4,), num_steps=3)
