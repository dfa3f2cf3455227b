"""What the network is trained to output and how it is sampled: DDPM, EDM or flow matching.

A :class:`Formulation` is one frozen value (the kind and its hyper-parameters) built once at the
config boundary from ``config.diffusion`` (``builders.formulation``). The training step
(``state.make_train_step``) and the sampler (``generate.Generator``) keep their DDPM path for
``"ddpm"`` and call :meth:`Formulation.loss` / :meth:`Formulation.sample` for the others:

| kind | objective | network input; output | samplers (evaluations) |
|---|---|---|---|
| ddpm | ``losses.diffusion_loss`` | x_t, t ∈ [0, T); ε / x_0 / v | ``samplers.METHODS`` |
| edm | ``edm.loss``, log-normal σ | c_in x, ln(σ)/4; F (D = c_skip x + c_out F) | heun, euler |
| flow | ``flow.loss``, logit-normal t | x_t, 1000 t; v̂ ≈ ε - x_0 | euler (N), heun (2N) |

The network is passed in as ``net_fn(x_in, t_in, **cond) -> [B, ...]``, its time input a float
``[B]`` (the UNet's timestep embedding takes float times): EDM's c_noise = ln(σ)/4 (Karras et al.
2022, Table 1), flow's ``1000 t`` (SD3 / diffusers). Classifier-free guidance may wrap ``net_fn``
(``guidance.classifier_free``): D and v are affine in the network output with the same
coefficients for both halves, so guiding the output guides D and v. ``clip_x0``, ``eta``,
``variance`` and ``spacing`` of the sampling settings are DDPM's and are not used here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ddpm_jax import edm, flow
from ddpm_jax.errors import UsageError

KINDS = ("ddpm", "edm", "flow")
FLOW_TIME_SCALE = 1000.0  # the network sees 1000 t (SD3, diffusers' FlowMatchEulerDiscrete)

NetFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Formulation:
    """The formulation of a run (``config.diffusion``, same field names; ``kind`` is
    ``config.diffusion.formulation``).

    Attributes:
      kind: one of :data:`KINDS`; "ddpm" is the discrete-time model of ``config.diffusion``'s
        schedule and prediction, and none of the other fields are used.
      sigma_data: EDM's σ_d, the data's standard deviation (preconditioning and loss weight).
      p_mean, p_std: EDM's training σ, ln σ ~ N(p_mean, p_std²).
      sigma_min, sigma_max, rho: EDM's sampling grid (``edm.sigma_steps``).
      t_distribution: flow's training times, one of ``flow.T_DISTRIBUTIONS`` (logit-normal:
        sigmoid of N(0, 1), SD3's default).
      shift: flow's time shift s (SD3; 1: none), of the training times and the sampling grid.
    """

    kind: str = "ddpm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    t_distribution: str = "logit_normal"
    shift: float = 1.0

    def replace(self, **changes: Any) -> Formulation:
        """This formulation with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def methods(self) -> tuple[str, ...] | None:
        """The sampler methods of this formulation; None: DDPM's (``samplers.METHODS``)."""
        return {"edm": edm.METHODS, "flow": flow.METHODS}.get(self.kind)

    def check(self, prefix: str = "config.diffusion.") -> Formulation:
        """Raises UsageError naming the first invalid field (``prefix + name``); returns self."""

        def fail(name: str, value: Any, allowed: str) -> None:
            raise UsageError(f"{prefix}{name}={value!r} is invalid: {allowed}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value > 0):
                fail(name, value, "expected a finite number > 0")

        if self.kind not in KINDS:
            fail("formulation", self.kind, f"expected one of {list(KINDS)}")
        for name in ("sigma_data", "p_std", "sigma_min", "sigma_max", "rho", "shift"):
            positive(name)
        if not isinstance(self.p_mean, int | float) or not math.isfinite(self.p_mean):
            fail("p_mean", self.p_mean, "expected a finite number")
        if self.sigma_min >= self.sigma_max:
            fail("sigma_min", self.sigma_min, f"must be < sigma_max={self.sigma_max}")
        if self.t_distribution not in flow.T_DISTRIBUTIONS:
            fail("t_distribution", self.t_distribution, f"expected one of {flow.T_DISTRIBUTIONS}")
        return self

    def nfe(self, method: str, num_steps: int) -> int:
        """Network evaluations per sample of ``method`` with ``num_steps`` steps (guidance
        evaluates conditional and unconditional halves in one batched call)."""
        if self.kind == "edm" and method == "heun":
            return 2 * num_steps - 1
        if self.kind == "flow" and method == "heun":
            return 2 * num_steps
        return num_steps

    def _wrapped(self, net_fn: NetFn) -> Callable[..., jax.Array]:
        """The denoiser D(x; σ) (edm) or velocity v(x_t, t) (flow) of ``net_fn``."""
        if self.kind == "edm":
            return edm.denoiser(net_fn, sigma_data=self.sigma_data, kind="edm")
        if self.kind == "flow":
            return lambda x, t, **cond: net_fn(x, FLOW_TIME_SCALE * t, **cond)
        raise ValueError(f"the {self.kind!r} formulation is the engine's own DDPM path")

    def loss(
        self, net_fn: NetFn, keys: jax.Array, x0: jax.Array, cond: dict | None = None
    ) -> jax.Array:
        """The training loss of a batch, averaged over examples and pixels.

        Args:
          net_fn: ``net_fn(x_in, t_in, **cond) -> [B, ...]`` the network.
          keys: ``[B]`` per-example keys: example b's σ (or t) and noise come from ``keys[b]``.
          x0: ``[B, H, W, C]`` clean images.
          cond: keyword arguments of ``net_fn`` (labels after dropout).

        Returns:
          float32 scalar: ``edm.loss`` (EDM weighting) or ``flow.loss``.
        """
        fn = self._wrapped(net_fn)
        if self.kind == "edm":
            sigma, noise = edm.sample_sigma_and_noise(
                keys, x0, distribution="lognormal", p_mean=self.p_mean, p_std=self.p_std
            )
            return edm.loss(
                fn, x0, sigma, noise, sigma_data=self.sigma_data, weighting="edm", cond=cond
            )
        t, noise = flow.sample_t_and_noise(
            keys, x0, distribution=self.t_distribution, shift=self.shift
        )
        return flow.loss(fn, x0, t, noise, cond=cond)

    def sample(
        self,
        net_fn: NetFn,
        keys: jax.Array,
        shape: tuple[int, ...],
        method: str,
        num_steps: int,
        x_T: jax.Array | None = None,
    ) -> jax.Array:
        """Samples with the deterministic sampler of this formulation.

        Args:
          net_fn: ``net_fn(x_in, t_in) -> [B, ...]`` the network (conditioning bound, guided).
          keys: ``[B]`` per-sample keys; sample b starts from ``normal(keys[b])`` (times σ_max
            for EDM).
          shape: ``(B, H, W, C)``.
          method: one of :attr:`methods`.
          num_steps: N: EDM's ``edm.sigma_steps(N)`` (Heun: 2N - 1 evaluations), flow's
            ``flow.timesteps(N, shift)`` (Heun: 2N).
          x_T: optional ``[B, H, W, C]`` starting states (EDM: at σ_max) instead of the keys'.

        Returns:
          ``[B, H, W, C]`` float32 samples (not clipped).
        """
        noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)
        fn = self._wrapped(net_fn)
        if self.kind == "edm":
            sigmas = edm.sigma_steps(num_steps, self.sigma_min, self.sigma_max, self.rho)
            x = sigmas[0] * noise if x_T is None else x_T
            return edm.sample(fn, x, sigmas, method=method)
        x = noise if x_T is None else x_T
        return flow.sample(fn, x, flow.timesteps(num_steps, self.shift), method=method)


DDPM = Formulation()
"""The default: the engine's discrete-time DDPM path."""

DEFAULTS = {
    ("formulation" if f.name == "kind" else f.name): f.default
    for f in dataclasses.fields(Formulation)
}
"""The ``config.diffusion`` fields of the formulation and their defaults (DDPM: today's runs)."""

__all__ = ["DDPM", "DEFAULTS", "FLOW_TIME_SCALE", "KINDS", "Formulation"]
