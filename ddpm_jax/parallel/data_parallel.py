"""Data parallelism with a replicated state: one per-device step, two wrappers.

A per-device step ``step_fn(state, batch) -> (state, metrics)`` (``ddpm_jax.state``) sees its own
rows of the batch and averages over the mapped axis ``"data"`` with ``lax.pmean``. Two wrappers
run it on every device of the job:

- ``"shard_map"`` (default): ``jax.jit(jax.shard_map(...))`` over a 1-D mesh of all devices;
  the batch is sharded on ``"data"``, the state is replicated (``NamedSharding(mesh, P())``).
  This is what ``jax.pmap`` itself became in JAX 0.8.
- ``"pmap"``: ``jax.pmap`` over the same devices; the state carries a leading device axis.
  ``jax.pmap`` takes no compiler options, so on CPU it misses :func:`compiler_options`.

Both donate the state and scan ``k`` steps per call (``batch`` leaves have a leading ``[k]``
axis), which amortises dispatch as in score_sde. In both, the state outside the step (for
checkpoints and sampling) is a replicated global array (:meth:`DataParallel.to_step` /
:meth:`DataParallel.from_step` convert it for pmap). Every device holds the whole state: 16 bytes
per float32 parameter (parameters, two Adam moments, EMA); ``ddpm_jax.parallel.fsdp`` shards it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.parallel import layout
from ddpm_jax.parallel.layout import AXIS, Layout, make_mesh

PyTree = Any


class DataParallel(Layout):
    """Runs a per-device step over every device of a mesh with ``shard_map`` or ``pmap``.

    Args:
      kind: ``"shard_map"`` or ``"pmap"``.
      mesh: the 1-D ``"data"`` mesh (default: all devices, :func:`make_mesh`).

    Attributes: those of :class:`~ddpm_jax.parallel.layout.Layout`; ``global_view`` is False
    (it wraps per-device steps).
    """

    KINDS = ("shard_map", "pmap")

    def __init__(self, kind: str = "shard_map", mesh: Mesh | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"parallel={kind!r} is unknown; expected one of {list(self.KINDS)}")
        self.kind = kind
        super().__init__(make_mesh() if mesh is None else mesh, AXIS)
        self._stacked = NamedSharding(self.mesh, P(AXIS))

    # ------------------------------------------------------------------ state layout

    def to_step(self, state: PyTree) -> PyTree:
        """Replicated global arrays -> the layout the wrapped step takes (``[D, ...]`` for pmap).

        Every device's own replica becomes its row (no host transfer, no collective).
        """
        if self.kind != "pmap":
            return state

        def stack(x):
            buffers = {s.device: s.data for s in x.addressable_shards}
            arrays = [buffers[d][None] for d in self.local_devices]
            shape = (self.num_devices, *x.shape)
            return jax.make_array_from_single_device_arrays(shape, self._stacked, arrays)

        return jax.tree.map(stack, state)

    def from_step(self, state: PyTree) -> PyTree:
        """The step's layout -> replicated global arrays (``NamedSharding(mesh, P())``).

        For pmap the step returns ``[D, ...]`` arrays (process-local ``[local D, ...]`` ones in a
        multi-process job); every device's own row becomes its replica.
        """
        if self.kind != "pmap":
            return state

        def unstack(x):
            buffers = {s.device: s.data for s in x.addressable_shards}
            arrays = [buffers[d].reshape(x.shape[1:]) for d in self.local_devices]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, arrays)

        return jax.tree.map(unstack, state)

    # ------------------------------------------------------------------ batches

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays laid out for the wrapped step.

        Args:
          local_batch: leaves ``[k, local_B, ...]`` (``k`` steps, ``local_B`` rows of this
            process, divisible by its device count).

        Returns:
          shard_map: ``[k, B, ...]`` sharded on axis 1; pmap: ``[D, k, B / D, ...]`` sharded on
          axis 0. Device ``j`` of the mesh receives global rows ``[j B/D, (j+1) B/D)``.
        """
        if self.kind != "pmap":
            return super().shard_batch(local_batch)

        def put(x):
            x = self._check_rows(x)
            k, local_b = x.shape[:2]
            per = local_b // self.num_local_devices
            x = x.reshape(k, self.num_local_devices, per, *x.shape[2:]).swapaxes(0, 1)
            shape = (self.num_devices, k, per, *x.shape[3:])
            return jax.make_array_from_process_local_data(self._stacked, x, shape)

        return {name: put(x) for name, x in local_batch.items()}

    # ------------------------------------------------------------------ the step

    def map_grads(self, grad_fn: Callable) -> Callable:
        """The device's loss and gradient averaged over the mapped ``"data"`` axis
        (``lax.pmean``): ``wrap`` maps the step over every device."""

        def fn(params, step, batch):
            loss, grads = grad_fn(params, step, batch)
            return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS)

        return fn

    def wrap(
        self, step_fn: Callable[[PyTree, dict], tuple[PyTree, dict]], *, donate: bool = True
    ) -> Callable[[PyTree, dict], tuple[PyTree, dict]]:
        """Maps ``step_fn`` over all devices and scans it over the leading ``k`` batch axis.

        Args:
          step_fn: the per-device step (reducing with :meth:`map_grads`).
          donate: donate the input state's buffers.

        Returns:
          ``fn(state, batch) -> (state, metrics)`` taking the layouts of :meth:`to_step` and
          :meth:`shard_batch`; metric leaves are ``[k]`` (shard_map, replicated) or ``[D, k]``
          (pmap); read them with :meth:`metrics_to_host`.
        """

        def scanned(state, batch):
            return jax.lax.scan(step_fn, state, batch)

        donate_argnums = (0,) if donate else ()
        if self.kind == "pmap":
            return jax.pmap(
                scanned, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums
            )
        mapped = jax.shard_map(
            scanned,
            mesh=self.mesh,
            in_specs=(P(), P(None, AXIS)),
            out_specs=(P(), P()),
            # pmap semantics: without this, the gradient with respect to the replicated params
            # would be psum-ed implicitly and the step's explicit pmean would not average it.
            check_vma=False,
        )
        options = layout.compiler_options(self.devices)
        return jax.jit(mapped, donate_argnums=donate_argnums, compiler_options=options)

    def metrics_to_host(self, metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """Metric leaves (identical on every device) -> numpy ``[k]`` from a local device."""
        host = super().metrics_to_host(metrics)
        return {name: x[0] for name, x in host.items()} if self.kind == "pmap" else host


__all__ = ["DataParallel"]
