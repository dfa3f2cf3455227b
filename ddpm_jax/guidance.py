"""Guidance as ``model_fn`` wrappers: each takes a ``model_fn`` and returns a ``model_fn``.

- :func:`classifier_free`: classifier-free guidance (Ho & Salimans 2022) with one batched call.
- :func:`classifier`: classifier guidance (Dhariwal & Nichol 2021) with the gradient of any
  differentiable noisy classifier.

The wrapped functions have the signature ``guided(x_t, t, **cond) -> [B, ...]`` (``x_t: [B, ...]``,
``t: int32 [B]``), so they compose with each other and with :func:`ddpm_jax.samplers.sample` once
the conditioning is bound::

    guided = guidance.classifier_free(model_fn, guidance_scale, null_label=num_classes)
    x = samplers.sample(functools.partial(guided, y=labels), schedule, key, (B, 32, 32, 3))

Guidance scales are ordinary (traceable) values: under ``jax.jit`` a new scale does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule

ModelFn = Callable[..., jax.Array]


def classifier_free(
    model_fn: ModelFn,
    guidance_scale: float | jax.Array,
    null_label: int | None = None,
    *,
    null_cond: dict | None = None,
) -> ModelFn:
    """Classifier-free guidance: ε̃ = ε(x, ∅) + s (ε(x, c) - ε(x, ∅)), s = ``guidance_scale``.

    Convention: ``guidance_scale = 1`` is the plain conditional model and 0 the unconditional one;
    Ho & Salimans (2022) write ε̃ = (1 + w) ε(x, c) - w ε(x, ∅), so their w is
    ``guidance_scale - 1`` (w = 0 is s = 1). The combination is linear in the network output, so
    it applies unchanged to "x0" and "v" predictions.

    The returned function evaluates the network ONCE on a batch of 2B: the conditional inputs
    followed by their unconditional copies, ``model_fn(concat[x, x], concat[t, t],
    **{k: concat[c_k, null_k]})``. The null value of label entry ``y`` is ``null_label`` (e.g. the
    UNet's ``num_classes``); every other conditioning entry (e.g. ``context``) takes its null value
    from ``null_cond`` (e.g. the empty-prompt context ``[M, D]`` or ``[1, M, D]``), broadcast to
    the entry's shape. Evaluated as s ε_c + (1 - s) ε_∅, so s = 1 and s = 0 return exactly the
    conditional and unconditional halves of the batched call.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> [B, ...]``.
        guidance_scale: s, a float or a traced scalar (or ``[B, 1, ...]`` per-example scales).
        null_label: the unconditional label for ``cond["y"]``.
        null_cond: unconditional values for other entries of ``cond`` (may also hold ``"y"``).

    Returns:
        ``guided(x_t, t, **cond) -> [B, ...]``.

    Raises:
        ValueError: (when called) if ``cond`` is empty or an entry has no null value; if ``x_t``
            is not float ``[B, ...]`` (rank >= 2), ``t`` neither ``[B]`` nor a scalar, a
            conditioning entry not ``[B, ...]`` or its null value not broadcastable to it.
    """
    nulls = dict(null_cond or {})
    if null_label is not None:
        nulls.setdefault("y", null_label)

    def guided(x_t: jax.Array, t: jax.Array, **cond) -> jax.Array:
        if not cond:
            raise ValueError(
                "classifier_free guidance needs conditioning (e.g. y=labels or context=...) "
                "to contrast with the unconditional model; got none"
            )
        missing = sorted(k for k in cond if k not in nulls)
        if missing:
            raise ValueError(
                f"classifier_free: no null value for conditioning {missing}; pass null_label "
                f"(for 'y') or null_cond={{name: value}}; have nulls for {sorted(nulls)}"
            )
        batch = diffusion.check_data("classifier_free", x_t=x_t)
        if jnp.shape(t) not in ((), (batch,)):
            raise ValueError(
                f"classifier_free: t must be [B] = ({batch},) or a scalar, got shape {jnp.shape(t)}"
            )
        both = {}
        for name, value in cond.items():
            value = jnp.asarray(value)
            if value.shape[:1] != (batch,):
                raise ValueError(
                    f"classifier_free: conditioning {name!r} must be [B, ...] with B = {batch} "
                    f"(the batch of x_t), got shape {value.shape}"
                )
            null = jnp.asarray(nulls[name], value.dtype)
            try:
                null = jnp.broadcast_to(null, value.shape)
            except ValueError as e:
                raise ValueError(
                    f"classifier_free: the null value of {name!r}, shape {null.shape}, does not "
                    f"broadcast to the conditioning's shape {value.shape}"
                ) from e
            both[name] = jnp.concatenate([value, null])
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), **both)
        if jnp.shape(out)[:1] != (2 * batch,):
            raise ValueError(
                f"classifier_free: model_fn must return [2B, ...] with 2B = {2 * batch} for the "
                f"conditional and unconditional halves, got shape {jnp.shape(out)}"
            )
        out_cond, out_uncond = jnp.split(out, 2)
        s = jnp.asarray(guidance_scale, out.dtype)
        return s * out_cond + (1 - s) * out_uncond

    return guided


def classifier(
    model_fn: ModelFn,
    log_prob_fn: Callable[..., jax.Array],
    scale: float | jax.Array,
    schedule: Schedule,
    *,
    prediction: str = "eps",
) -> ModelFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / Eq. 14), via ``jax.grad``.

    ε̃(x_t) = ε(x_t) - √(1-ᾱ_t) · s · ∇ₓ log p(y | x_t, t): the score is shifted toward the class,
    i.e. one samples ∝ p_t(x) p_t(y | x)^s. With the exact noisy posterior and s = 1 this is
    exactly the conditional distribution p(x | y); larger s concentrates samples further. For
    ``prediction="x0"`` / ``"v"`` the same shift is expressed in that parametrization.

    Args:
        model_fn: ``model_fn(x_t, t, **cond) -> [B, ...]`` (usually unconditional; it receives the
            same ``cond`` as the classifier — wrap it to drop entries it does not take).
        log_prob_fn: ``log_prob_fn(x_t, t, **cond) -> [B]``, log p(y | x_t, t) per example (the
            target class is part of ``cond``, e.g. ``y``); must be differentiable in ``x_t`` and
            each example's value must depend only on its own ``x_t``.
        scale: s, a float or a traced scalar.
        schedule: the noise schedule.
        prediction: what ``model_fn`` returns: "eps", "x0" or "v".

    Returns:
        ``guided(x_t, t, **cond) -> [B, ...]``.

    Raises:
        ValueError: for an unknown ``prediction``; (when called) if ``x_t`` is not float
            ``[B, ...]`` (rank >= 2), ``t`` not int ``[B]`` or the model output not shaped like
            ``x_t``.
    """
    diffusion.check_prediction(prediction)

    def guided(x_t: jax.Array, t: jax.Array, **cond) -> jax.Array:
        batch = diffusion.check_data("classifier", x_t=x_t)
        diffusion.check_timesteps("classifier", t, batch)
        out = model_fn(x_t, t, **cond)
        if jnp.shape(out) != x_t.shape:
            raise ValueError(
                f"classifier: model_fn(x_t, t) must return an array shaped like x_t {x_t.shape}, "
                f"got {jnp.shape(out)}"
            )
        grad = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, **cond)))(x_t)
        shift = -diffusion.extract(schedule.sqrt_one_minus_alpha_bars, t, x_t) * scale * grad
        if prediction == "x0":  # x0 = (x_t - √(1-ᾱ) ε) / √ᾱ
            shift = -diffusion.extract(schedule.sqrt_recipm1_alpha_bars, t, x_t) * shift
        elif prediction == "v":  # ε = √(1-ᾱ) x_t + √ᾱ v
            shift = diffusion.extract(schedule.sqrt_recip_alpha_bars, t, x_t) * shift
        return out + shift.astype(out.dtype)

    return guided
