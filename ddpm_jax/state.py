"""Training state, optimizer, EMA and the training step (written once, pmap-style; FSDP reuses it).

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
    >>> step_fn = make_train_step(apply_fn, schedule, optimizer, seed=0, global_batch_size=128,
    ...                           axis_name="data")
    >>> state, metrics = step_fn(state, batch)  # inside shard_map / pmap over "data"

:func:`make_train_step` is the per-device step (pmap-style: its own rows, ``lax.pmean`` over the
devices); :func:`make_global_train_step` is the same step on the global batch, for ``jax.jit``
with shardings (FSDP). Both are made of the same two pieces, the per-device loss and gradient
and the update, so they cannot drift apart; tests compare them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import losses
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


class _StepMath(NamedTuple):
    """The pieces of one training step, shared by the per-device and the global-view step."""

    device_grads: Callable  # (params, step, rows) -> (loss, grads) of those rows
    update: Callable  # (state, loss, grads) -> (state, metrics), loss and grads averaged


def _step_math(
    apply_fn,
    schedule,
    optimizer,
    *,
    seed,
    global_batch_size,
    lr_schedule,
    prediction,
    weighting,
    min_snr_gamma,
    ema_decay,
    p_uncond,
    null_label,
) -> _StepMath:
    def device_grads(params, step, batch):
        """The loss and gradient of one device's rows (not yet averaged over devices)."""
        x0 = batch["image"]
        keys = example_keys(seed, step, batch["index"])
        t, noise, drop = draw_example_randomness(
            keys, x0.shape[1:], schedule.num_timesteps, p_uncond
        )
        cond = {}
        if null_label is not None:
            cond["y"] = jnp.where(drop, null_label, batch["label"]).astype(jnp.int32)
        step_key = jax.random.fold_in(jax.random.key(seed), step)
        dropout_key = jax.random.fold_in(step_key, global_batch_size)  # one for all devices
        rows = batch["index"]

        def loss_fn(params):
            model_fn = lambda x_t, t_, **c: apply_fn(
                params, x_t, t_, rng=dropout_key, example_index=rows, **c
            )
            return losses.diffusion_loss(
                model_fn,
                schedule,
                x0,
                t,
                noise,
                prediction=prediction,
                weighting=weighting,
                min_snr_gamma=min_snr_gamma,
                cond=cond,
            )

        return jax.value_and_grad(loss_fn)(params)

    def update(state, loss, grads):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, ema_decay),
            opt_state=opt_state,
        )
        return new_state, metrics

    return _StepMath(device_grads, update)


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    global_batch_size: int,
    axis_name: str,
    lr_schedule: optax.Schedule | None = None,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    ema_decay: float = 0.9999,
    p_uncond: float = 0.1,
    null_label: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The per-device training step, to be mapped over ``axis_name`` (see ``ddpm_jax.parallel``).

    Args:
      apply_fn: ``apply_fn(params, x_t, t, y=None, rng=None, example_index=None) ->
        [b, H, W, C]`` the network in training mode (``rng`` is its dropout key,
        ``example_index`` int32 ``[b]`` the rows' global indices that key the dropout masks;
        ``y`` int32 ``[b]`` labels when ``null_label`` is set).
      schedule: the noise schedule.
      optimizer: the optax transformation the state was created with.
      seed: the config seed (per-example keys, see the module docstring).
      global_batch_size: B, rows of the global batch (the tag of the dropout key).
      axis_name: the mapped data axis; gradients, loss and grad norm are averaged over it.
      lr_schedule: reported as metric ``lr``; None reports nothing.
      prediction / weighting / min_snr_gamma: the loss (``ddpm_jax.losses.diffusion_loss``).
      ema_decay: decay of ``ema_params``.
      p_uncond: label dropout probability (conditional models only).
      null_label: the label of the null condition of a conditional model (``model.null_label``:
        ``num_classes`` of a class-conditional UNet), else None. Dropped labels become it.

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; ``batch`` holds this device's rows:
      ``"image"`` float32 ``[b, H, W, C]`` in [-1, 1], ``"label"`` int32 ``[b]`` and ``"index"``
      int32 ``[b]``, the rows' positions in the global batch. ``metrics``: float32 scalars
      ``loss`` (mean over the global batch, before the update), ``grad_norm`` (global norm of the
      averaged gradient, before clipping) and ``lr`` (learning rate of this update); identical on
      every device.
    """
    parts = _step_math(
        apply_fn,
        schedule,
        optimizer,
        seed=seed,
        global_batch_size=global_batch_size,
        lr_schedule=lr_schedule,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
        ema_decay=ema_decay,
        p_uncond=p_uncond,
        null_label=null_label,
    )

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads = parts.device_grads(state.params, state.step, batch)
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        return parts.update(state, loss, grads)

    return step_fn


GradFn = Callable[[PyTree, jax.Array, dict], tuple[jax.Array, PyTree]]


def make_global_train_step(
    apply_fn: Callable[..., jax.Array],
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    global_batch_size: int,
    map_grads: Callable[[GradFn], GradFn],
    lr_schedule: optax.Schedule | None = None,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    ema_decay: float = 0.9999,
    p_uncond: float = 0.1,
    null_label: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The training step of :func:`make_train_step` on the global batch, for ``jax.jit`` with
    shardings (``ddpm_jax.parallel.fsdp``).

    The loss and gradient are those of the per-device step: its gradient function (one device's
    rows with their per-example keys and dropout masks) mapped over the devices by
    ``map_grads``, which also averages them; the update (clipping, Adam, EMA) runs on the global
    view, in whatever sharding ``map_grads`` returns the gradient (FSDP: that of the parameters,
    so Adam and the EMA run on shards). The results equal the per-device step's up to the float32
    order of the gradient sum, with dropout too.

    Args:
      apply_fn / schedule / optimizer / seed / global_batch_size / lr_schedule / prediction /
        weighting / min_snr_gamma / ema_decay / p_uncond / null_label: see
        :func:`make_train_step`.
      map_grads: turns the per-device ``grad_fn(params, step, rows) -> (loss, grads)`` (the
        loss and gradient of one device's rows) into ``fn(params, step, batch) -> (loss,
        grads)`` of the global batch, averaged over all rows (e.g.
        ``FullyShardedDataParallel.map_grads``: ``shard_map`` and a reduce-scatter).

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; ``batch`` holds the global batch
      (``"image"`` float32 ``[B, H, W, C]``, ``"label"`` and ``"index"`` int32 ``[B]``);
      ``metrics`` as in :func:`make_train_step`.
    """
    parts = _step_math(
        apply_fn,
        schedule,
        optimizer,
        seed=seed,
        global_batch_size=global_batch_size,
        lr_schedule=lr_schedule,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
        ema_decay=ema_decay,
        p_uncond=p_uncond,
        null_label=null_label,
    )
    global_grads = map_grads(parts.device_grads)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, grads = global_grads(state.params, state.step, batch)
        return parts.update(state, loss, grads)

    return step_fn


__all__ = [
    "TrainState",
    "create_train_state",
    "draw_example_randomness",
    "ema_update",
    "example_keys",
    "learning_rate_schedule",
    "make_global_train_step",
    "make_optimizer",
    "make_train_step",
]
