"""Training state, optimizer, EMA and the training step (one, whatever the parallel layout).

The optimizer of Ho et al. (2020) by default: Adam (lr 2e-4), linear warm-up over 5,000 steps,
gradient clipping at global norm 1.0, and an exponential moving average of the parameters with
decay 0.9999.

Randomness is keyed per example: the example in row ``i`` of the global batch of step ``s`` draws
its timestep, noise and label dropout from ``fold_in(fold_in(key(seed), s), i)``, so what an
example receives does not depend on how many devices or processes share the batch. The UNet's
dropout takes one key, ``fold_in(fold_in(key(seed), s), B)`` (``B`` the global batch size, so the
two families of keys never collide), the same on every device, and the rows' global indices:
the mask of row ``i`` is a function of (that key, ``i``) alone. So training is device-count
invariant with dropout too (up to the reduction order of the gradient mean).

Example:
    >>> optimizer = make_optimizer(lr=2e-4, warmup_steps=5000, grad_clip=1.0)
    >>> state = create_train_state(params, optimizer)
    >>> settings = StepSettings(seed=0, global_batch_size=128)
    >>> step_fn = make_train_step(apply_fn, schedule, optimizer, settings,
    ...                           map_grads=pmean_grads("data"))
    >>> state, metrics = step_fn(state, batch)  # inside shard_map / pmap over "data"

:func:`make_train_step` is the one step: each device's loss and gradient, reduced by the layout
(``map_grads``: ``lax.pmean`` over a mapped axis under data parallelism, FSDP's reduce-scatter on
the global view), then the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import losses
from ddpm_jax.formulation import DDPM, Formulation
from ddpm_jax.schedules import Schedule

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs besides the config (data order and randomness are pure
    functions of ``config.seed`` and ``step``).

    Attributes:
      step: int32 scalar, the number of completed updates; the next update uses batch ``step``.
      params: the model variables (``{"params": ...}`` for Flax).
      ema_params: exponential moving average of ``params`` (used for sampling).
      opt_state: the optax state (Adam moments and counts).
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr``: update ``s`` (0-based) uses ``lr * min(1, (s + 1) / warmup)``.

    Ho et al. warm up as ``lr * min(1, s / warmup)``; the ``+ 1`` keeps the first update from
    being a no-op. ``warmup_steps = 0`` gives the constant ``lr``.

    Returns:
      ``count -> float32 scalar`` learning rate.
    """
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)

    def schedule(count):
        frac = (jnp.asarray(count, jnp.float32) + 1.0) / float(warmup_steps)
        return lr * jnp.minimum(1.0, frac)

    return schedule


def make_optimizer(
    lr: float = 2e-4,
    warmup_steps: int = 5000,
    grad_clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam with linear warm-up after clipping the gradient's global norm (0 disables clipping).

    Returns:
      ``optax.chain(clip_by_global_norm(grad_clip), adam(learning_rate_schedule(...)))``.
    """
    schedule = learning_rate_schedule(lr, warmup_steps)
    adam = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    if grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adam)
    return adam


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0, with ``ema_params`` a copy of ``params``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.array, params),
        opt_state=optimizer.init(params),
    )


def ema_update(ema_params: PyTree, params: PyTree, decay: float) -> PyTree:
    """``decay * ema + (1 - decay) * params``, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def example_keys(seed: int, step: jax.Array, index: jax.Array) -> jax.Array:
    """Per-example keys ``fold_in(fold_in(key(seed), step), index)``.

    Args:
      seed: the config seed.
      step: int32 scalar, the 0-based update index.
      index: int32 ``[b]`` rows of the examples in the global batch.

    Returns:
      ``[b]`` typed PRNG keys.
    """
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def draw_example_randomness(
    keys: jax.Array, image_shape: tuple[int, ...], num_timesteps: int, p_uncond: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Timestep, noise and label-dropout flag of each example from its own key.

    Args:
      keys: ``[b]`` per-example keys (see :func:`example_keys`).
      image_shape: ``(H, W, C)``.
      num_timesteps: T.
      p_uncond: probability of replacing the label by the null label.

    Returns:
      ``(t, noise, drop)``: int32 ``[b]`` in [0, T), float32 ``[b, H, W, C]``, bool ``[b]``.
    """

    def one(key):
        k_t, k_noise, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (), 0, num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(k_noise, image_shape, jnp.float32)
        return t, noise, jax.random.bernoulli(k_drop, p_uncond)

    return jax.vmap(one)(keys)


def split_dropout_keys(keys: jax.Array, p_uncond: float) -> tuple[jax.Array, jax.Array]:
    """Each example's key split into the key of its σ / t and noise (the EDM and flow losses,
    ``Formulation.loss``) and its label-dropout flag.

    Returns:
      ``(keys [b], drop bool [b])``.
    """

    def one(key):
        k_loss, k_drop = jax.random.split(key)
        return k_loss, jax.random.bernoulli(k_drop, p_uncond)

    return jax.vmap(one)(keys)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The settings of the training step besides the network, schedule and optimizer.

    Attributes:
      seed: the config seed (per-example keys, see the module docstring).
      global_batch_size: B, rows of the global batch (the tag of the dropout key).
      prediction / weighting / min_snr_gamma: the loss (``ddpm_jax.losses.diffusion_loss``).
      ema_decay: decay of ``ema_params``.
      p_uncond: label dropout probability (conditional models only).
      formulation: what the network learns (``ddpm_jax.formulation``); for "edm" and "flow"
        each example's key is split into the key of its σ / t and noise
        (``Formulation.loss``) and that of its label dropout; "ddpm" uses ``prediction``,
        ``weighting`` and ``min_snr_gamma`` with :func:`draw_example_randomness`.
    """

    seed: int
    global_batch_size: int
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.9999
    p_uncond: float = 0.1
    formulation: Formulation = DDPM

    def replace(self, **changes: Any) -> StepSettings:
        """These settings with some fields changed."""
        return dataclasses.replace(self, **changes)


GradFn = Callable[[PyTree, jax.Array, dict], tuple[jax.Array, PyTree]]


def pmean_grads(axis_name: str) -> Callable[[GradFn], GradFn]:
    """The ``map_grads`` of a per-device step mapped over ``axis_name`` (pmap-style: shard_map,
    pmap, vmap): the device's loss and gradient, averaged over the axis with ``lax.pmean``."""

    def map_grads(grad_fn: GradFn) -> GradFn:
        def fn(params, step, batch):
            loss, grads = grad_fn(params, step, batch)
            return jax.lax.pmean(loss, axis_name), jax.lax.pmean(grads, axis_name)

        return fn

    return map_grads


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    settings: StepSettings,
    *,
    map_grads: Callable[[GradFn], GradFn],
    lr_schedule: optax.Schedule | None = None,
    null_label: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The training step: the loss and gradient of each device's rows, reduced by the layout
    (``map_grads``), then the update (clipping, Adam, EMA).

    Args:
      apply_fn: ``apply_fn(params, x_t, t, y=None, rng=None, example_index=None) ->
        [b, H, W, C]`` the network in training mode (``rng`` is its dropout key,
        ``example_index`` int32 ``[b]`` the rows' global indices that key the dropout masks;
        ``y`` int32 ``[b]`` labels when ``null_label`` is set).
      schedule: the noise schedule.
      optimizer: the optax transformation the state was created with.
      settings: the seed, global batch size, loss, EMA and label dropout (:class:`StepSettings`).
      map_grads: turns the per-device ``grad_fn(params, step, rows) -> (loss, grads)`` (one
        device's rows, not yet averaged) into the loss and gradient averaged over the global
        batch: the layout's ``map_grads`` (``Layout.map_grads``): :func:`pmean_grads` inside a
        mapped axis (data parallelism, a per-device step), or FSDP's ``shard_map`` and
        reduce-scatter (a global-view step, the update running on the shards).
      lr_schedule: reported as metric ``lr``; None reports nothing.
      null_label: the label of the null condition of a conditional model (``model.null_label``:
        ``num_classes`` of a class-conditional UNet), else None. Dropped labels become it.

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; ``batch`` holds the rows the layout gives
      the step (a device's under data parallelism, the global batch under FSDP):
      ``"image"`` float32 ``[b, H, W, C]`` in [-1, 1], ``"label"`` int32 ``[b]`` and ``"index"``
      int32 ``[b]``, the rows' positions in the global batch. ``metrics``: float32 scalars
      ``loss`` (mean over the global batch, before the update), ``grad_norm`` (global norm of the
      averaged gradient, before clipping) and ``lr`` (learning rate of this update).
    """
    c = settings

    def device_grads(params, step, batch):
        """The loss and gradient of one device's rows (not yet averaged over devices)."""
        x0 = batch["image"]
        keys = example_keys(c.seed, step, batch["index"])
        if c.formulation.kind == "ddpm":
            t, noise, drop = draw_example_randomness(
                keys, x0.shape[1:], schedule.num_timesteps, c.p_uncond
            )
        else:
            keys, drop = split_dropout_keys(keys, c.p_uncond)
        cond = {}
        if null_label is not None:
            cond["y"] = jnp.where(drop, null_label, batch["label"]).astype(jnp.int32)
        step_key = jax.random.fold_in(jax.random.key(c.seed), step)
        dropout_key = jax.random.fold_in(step_key, c.global_batch_size)  # one for all devices
        rows = batch["index"]

        def loss_fn(params):
            model_fn = lambda x_t, t_, **k: apply_fn(
                params, x_t, t_, rng=dropout_key, example_index=rows, **k
            )
            if c.formulation.kind != "ddpm":
                return c.formulation.loss(model_fn, keys, x0, cond)
            return losses.diffusion_loss(
                model_fn,
                schedule,
                x0,
                t,
                noise,
                prediction=c.prediction,
                weighting=c.weighting,
                min_snr_gamma=c.min_snr_gamma,
                cond=cond,
            )

        return jax.value_and_grad(loss_fn)(params)

    global_grads = map_grads(device_grads)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads = global_grads(state.params, state.step, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, c.ema_decay),
            opt_state=opt_state,
        )
        return new_state, metrics

    return step_fn


__all__ = [
    "StepSettings",
    "TrainState",
    "create_train_state",
    "draw_example_randomness",
    "ema_update",
    "example_keys",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "pmean_grads",
    "split_dropout_keys",
]
