"""Samples from trained parameters, in rounds sharded over every device.

:class:`Generator` draws images from a model's parameters with one sampler (a numerical method of
``ddpm_jax.samplers``) and classifier-free guidance for conditional models (class labels, or
prompts as tokens for a prompt-conditioned latent model), gathered on every process; sample ``i``
depends on ``(key, i)`` alone. ``ddpm_jax.runs`` loads trained runs and published weights to
sample from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import guidance, images, samplers, schedules
from ddpm_jax.formulation import DDPM, Formulation
from ddpm_jax.models.text import PAD_ID
from ddpm_jax.parallel import Layout, compiler_options
from ddpm_jax.sample_settings import SampleSettings
from ddpm_jax.workdir import log


class Generator:
    """Images from a model's parameters, in rounds sharded over the mesh's batch axis.

    Sample ``i`` of a call draws all its noise from its own key ``fold_in(key, i)``, so it is a
    function of (key, i) alone: the same whatever the device count, the round size or the
    sharding.

    The sampler sees gathered (replicated) parameters: a call gathers sharded ones (an FSDP run's
    EMA) once, then every round is pure data parallelism. Sampling evaluates the network
    ``num_steps`` times per round; with sharded parameters each evaluation would all-gather every
    weight again, while gathering once costs 4 bytes per float32 parameter on each device, a
    quarter of the training state that FSDP divides, and the forward passes keep no activations
    for a backward pass.

    Args:
      model: the network (``model.apply(params, x_t, t, y=...)``); conditional when
        ``model.null_label`` is not None.
      schedule: the noise schedule it was trained with.
      dp: the parallel layout whose devices the rounds are sharded over (all of them).
      image_shape: ``(H, W, C)`` of the model's inputs (latents for a latent model).
      settings: the sampler, its steps, guidance scale (the default of each call, a traced
        value: changing it does not recompile) and round size (``batch_size``, rounded up to a
        multiple of the device count); checked against the schedule here.
      prediction: what the model predicts, ``"eps"``, ``"x0"`` or ``"v"`` (DDPM).
      formulation: what the model was trained for (``ddpm_jax.formulation``): "ddpm" samples
        with ``samplers.sample``, "edm" and "flow" with ``Formulation.sample`` (the method is
        checked against its ``methods``).
      decode_fn: optional jittable map of sampled arrays to images in [-1, 1] (a VAE decoder).

    Raises:
      UsageError: ``settings`` are invalid (``SampleSettings.check``).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: schedules.Schedule,
        dp: Layout,
        image_shape: Sequence[int],
        settings: SampleSettings,
        *,
        prediction: str = "eps",
        formulation: Formulation = DDPM,
        decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    ):
        self.model, self.schedule, self.dp = model, schedule, dp
        self.image_shape = tuple(image_shape)
        self.settings = settings.check(schedule.num_timesteps, methods=formulation.methods)
        self.prediction, self.formulation, self.decode_fn = prediction, formulation, decode_fn
        self.sharding = dp.batch_sharding
        self._fns: dict[tuple[int, str], Callable] = {}
        # fold_in(key, i) for a round's global sample indices i, sharded like the round.
        fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
        self._sample_keys = jax.jit(fold, out_shardings=self.sharding)

    def with_settings(self, settings: SampleSettings) -> Generator:
        """This generator with other settings (itself when they are the same: its compiled
        programs are kept)."""
        if settings == self.settings:
            return self
        return Generator(
            self.model,
            self.schedule,
            self.dp,
            self.image_shape,
            settings,
            prediction=self.prediction,
            formulation=self.formulation,
            decode_fn=self.decode_fn,
        )

    def _fn(self, batch: int, conditioning: str) -> Callable:
        """The compiled sampler of a round of ``batch`` with "none", "labels" or "tokens"."""
        if (batch, conditioning) not in self._fns:
            shape = (batch, *self.image_shape)

            def generate(params, keys, cond, scale, x_T):  # x_T: None, or the round's x_T
                model_fn = lambda x_t, t, **c: self.model.apply(params, x_t, t, **c)
                if conditioning == "labels":
                    guided = guidance.classifier_free(model_fn, scale, self.model.null_label)
                    model_fn = lambda x_t, t: guided(x_t, t, y=cond)
                elif conditioning == "tokens":  # a PromptUNet given any prompt
                    from_tokens = lambda x_t, t, tokens: self.model.apply(
                        params, x_t, t, tokens, method=type(self.model).from_tokens
                    )
                    null = {"tokens": jnp.full(cond.shape[1:], PAD_ID, jnp.int32)}
                    guided = guidance.classifier_free(from_tokens, scale, null_cond=null)
                    model_fn = lambda x_t, t: guided(x_t, t, tokens=cond)
                if self.formulation.kind != "ddpm":
                    s = self.settings
                    x = self.formulation.sample(
                        model_fn, keys, shape, s.method, s.num_steps, x_T=x_T
                    )
                    return x if self.decode_fn is None else self.decode_fn(x)
                x = samplers.sample(
                    model_fn,
                    self.schedule,
                    keys,
                    shape,
                    prediction=self.prediction,
                    x_T=x_T,
                    **self.settings.sampler_kwargs(),
                )
                return x if self.decode_fn is None else self.decode_fn(x)

            self._fns[batch, conditioning] = jax.jit(
                generate,
                out_shardings=self.sharding,
                compiler_options=compiler_options(self.dp.devices),
            )
        return self._fns[batch, conditioning]

    def __call__(
        self,
        params: Any,
        key: jax.Array,
        num: int,
        *,
        labels: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        guidance_scale: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        x_T: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``num`` samples in rounds of ``batch_size`` rounded up to the device count.

        Args:
          params: the model variables on ``dp``'s mesh, e.g. the EMA parameters: replicated, or
            sharded (gathered once here, ``dp.gather``).
          key: sampling key; sample ``i`` uses ``fold_in(key, i)`` alone.
          num: number of samples.
          labels: ``[num]`` int32 class labels of a conditional model (default: cycling through
            ``0 .. null_label - 1``; ``null_label`` itself is the unconditional model).
          tokens: ``[num, L]`` int32 prompt tokens of a prompt-conditioned model (any text,
            ``Tokenizer.encode``), instead of labels.
          guidance_scale: overrides the default scale for this call.
          progress: optional ``progress(rounds_done, rounds)``, called after each round's
            images are on the host.
          should_stop: optional; when it returns True after a round, the call returns None
            (e.g. on a preemption notice).
          x_T: optional float32 ``[num, *image_shape]`` starting states instead of the keys'
            (to compare with another implementation); the keys still draw any per-step noise.

        Returns:
          ``(images uint8 [num, H, W, C], labels int32 [num])`` on every process (labels -1 for
          an unconditional model or token prompts).
        """
        params = self.dp.gather(params)
        d = self.dp.num_devices
        batch = -(-min(self.settings.batch_size, num) // d) * d
        rounds = -(-num // batch)
        total = rounds * batch
        default = self.settings.guidance_scale
        scale = np.float32(default if guidance_scale is None else guidance_scale)
        if tokens is not None:
            conditioning, labels = "tokens", np.full(num, -1, np.int32)
            cond = np.asarray(tokens, np.int32)
        elif self.model.null_label is None:
            conditioning, labels = "none", np.full(num, -1, np.int32)
            cond = labels
        else:
            conditioning = "labels"
            if labels is None:
                labels = np.arange(num) % self.model.null_label
            labels = cond = np.asarray(labels, np.int32)
        if len(cond) != num:
            raise ValueError(f"{len(cond)} labels or prompts for {num} samples")
        cond = np.concatenate([cond, np.repeat(cond[-1:], total - num, 0)])  # fills the last round
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            x_T = np.concatenate([x_T, np.repeat(x_T[-1:], total - num, 0)])
        out = []
        for r in range(rounds):
            chunk = cond[r * batch : (r + 1) * batch]
            c = jax.make_array_from_callback(chunk.shape, self.sharding, lambda i, c=chunk: c[i])
            keys = self._sample_keys(key, np.arange(r * batch, (r + 1) * batch, dtype=np.uint32))
            x_r = None
            if x_T is not None:
                part = x_T[r * batch : (r + 1) * batch]
                x_r = jax.make_array_from_callback(
                    part.shape, self.sharding, lambda i, p=part: p[i]
                )
            x = self._fn(batch, conditioning)(params, keys, c, scale, x_r)
            out.append(images.to_uint8(multihost_utils.process_allgather(x, tiled=True)))
            if progress is not None:
                progress(r + 1, rounds)
            if should_stop is not None and should_stop():
                return None
        return np.concatenate(out)[:num], labels


class ProgressLine:
    """``progress(done, total)`` printing ``label: batch r/R | n images | x images/s`` (process
    0; rewritten in place on a terminal)."""

    def __init__(self, label: str, num: int, enabled: bool = True):
        self.label, self.num, self.enabled = label, num, enabled
        self.start = time.time()
        self.tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        n = min(self.num, round(self.num * done / total))
        rate = n / max(time.time() - self.start, 1e-9)
        line = f"{self.label}: batch {done}/{total} | {n} images | {rate:.1f} images/s"
        log(("\r" if self.tty else "") + line, end="" if self.tty and done < total else "\n")


__all__ = ["Generator", "ProgressLine"]
