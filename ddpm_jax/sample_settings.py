"""How to draw samples: one frozen value with every setting of a sampling call, and its check.

:class:`SampleSettings` is the one list of the settings of sampling (the sampler of
``ddpm_jax.samplers`` with its grid, stochasticity, variance and clipping, the classifier-free
guidance scale, and the round size). A run's settings are built from ``config.sample`` at the
config boundary (``ddpm_jax.builders.sample_settings``), evaluation's by replacing the fields
``config.eval`` sets, a command's by :meth:`SampleSettings.override` with its flags; every one is
checked by :meth:`SampleSettings.check` before anything is compiled::

    settings = builders.sample_settings(config)           # config.sample
    fast = settings.replace(method="ddim", num_steps=20)   # another sampler, the rest kept
    fast.check(schedule.num_timesteps)                     # UsageError naming the field
    generator = Generator(model, schedule, dp, shape, fast, prediction="eps")
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ddpm_jax import diffusion, samplers, spacing
from ddpm_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The settings of sampling from a model (see ``ddpm_jax.samplers.sample``).

    Attributes:
      method: the sampler, one of ``samplers.METHODS`` (of an EDM or flow model: its
        ``Formulation.methods``, "heun" or "euler").
      num_steps: network evaluations of the grid (``heun``: ``2 * num_steps - 1``), in [2, T].
      eta: DDIM's stochasticity (0: deterministic); other methods ignore it.
      guidance_scale: classifier-free guidance scale of conditional models (>= 0; 1: the
        conditional model alone); unconditional models ignore it.
      clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]``; None: no clipping (latents).
      variance: the "ddpm" method's reverse variance, ``"fixed_small"`` (β̃) or
        ``"fixed_large"`` (β).
      spacing: the timestep grid, one of ``spacing.SPACINGS``; None: the method's default.
      batch_size: samples per compiled round (rounded up to the device count); the samples do
        not depend on it.
    """

    method: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    clip_x0: float | None = 1.0
    variance: str = "fixed_small"
    spacing: str | None = None
    batch_size: int = 256

    def replace(self, **changes: Any) -> SampleSettings:
        """These settings with some fields changed."""
        return dataclasses.replace(self, **changes)

    def override(self, **given: Any) -> SampleSettings:
        """These settings with the fields that are given (not None) changed: command-line flags
        over a run's settings."""
        return self.replace(**{k: v for k, v in given.items() if v is not None})

    def check(
        self, num_timesteps: int | None, prefix: str = "", methods: tuple[str, ...] | None = None
    ) -> SampleSettings:
        """Raises UsageError naming the first invalid field (``prefix + name``, e.g.
        ``config.sample.num_steps`` or ``--num_steps``); returns the settings.

        Args:
          num_timesteps: the schedule's T (``num_steps`` must be <= T); None: not checked.
          prefix: how the user names the fields.
          methods: the allowed methods (a formulation's, ``Formulation.methods``); None:
            ``samplers.METHODS``.
        """

        def fail(name: str, allowed: str) -> None:
            value = getattr(self, name)
            raise UsageError(f"{prefix}{name}={value!r} is invalid: {allowed}")

        def number(value: Any) -> bool:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return ok and math.isfinite(value)

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.method not in (samplers.METHODS if methods is None else methods):
            fail("method", f"expected one of {list(methods or samplers.METHODS)}")
        if not integer(self.num_steps) or self.num_steps < 2:
            fail("num_steps", "expected an integer >= 2")
        if num_timesteps is not None and self.num_steps > num_timesteps:
            fail("num_steps", f"must be <= the number of timesteps T={num_timesteps}")
        if not number(self.eta) or self.eta < 0:
            fail("eta", "expected a number >= 0")
        if not number(self.guidance_scale) or self.guidance_scale < 0:
            fail("guidance_scale", "expected a number >= 0")
        if self.clip_x0 is not None and not (number(self.clip_x0) and self.clip_x0 > 0):
            fail("clip_x0", "expected a number > 0 or None")
        if self.variance not in diffusion.VARIANCES:
            fail("variance", f"expected one of {list(diffusion.VARIANCES)}")
        if self.spacing is not None and self.spacing not in spacing.SPACINGS:
            fail("spacing", f"expected None or one of {list(spacing.SPACINGS)}")
        if not integer(self.batch_size) or self.batch_size < 1:
            fail("batch_size", "expected an integer >= 1")
        return self

    def sampler_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``samplers.sample`` (``eta`` only for DDIM, the one method
        that takes it)."""
        return dict(
            method=self.method,
            num_steps=self.num_steps,
            eta=self.eta if self.method == "ddim" else 0.0,
            clip_x0=self.clip_x0 or None,
            variance=self.variance,
            timestep_spacing=self.spacing,
        )

    def name(self) -> str:
        """``<method>_<steps>_g<scale>``, e.g. of an output directory."""
        return f"{self.method}_{self.num_steps}_g{self.guidance_scale:g}"


__all__ = ["SampleSettings"]
