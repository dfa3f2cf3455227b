"""Data parallelism over all devices of all processes: one per-device step, two wrappers.

A per-device step ``step_fn(state, batch) -> (state, metrics)`` (``ddpm_jax.state``) sees its own
rows of the batch and averages over the mapped axis ``"data"`` with ``lax.pmean``. Two wrappers
run it on every device of the job:

- ``"shard_map"`` (default): ``jax.jit(jax.shard_map(...))`` over a 1-D mesh of all devices;
  the batch is sharded on ``"data"``, the state is replicated (``NamedSharding(mesh, P())``).
  This is what ``jax.pmap`` itself became in JAX 0.8.
- ``"pmap"``: ``jax.pmap`` over the same devices; the state carries a leading device axis.
  ``jax.pmap`` takes no compiler options, so on CPU it misses :func:`compiler_options`.

Both donate the state and scan ``k`` steps per call (``batch`` leaves have a leading ``[k]``
axis), which amortises dispatch as in score_sde. In both, the canonical form of a state
outside the step (for checkpoints and sampling) is a replicated global array
(:meth:`DataParallel.to_replicated` / :meth:`DataParallel.from_replicated`).

The mesh orders devices by (process, id), so process ``p`` of ``P`` owns rows
``[p B/P, (p+1) B/P)`` of every global batch, exactly the rows ``ddpm_jax.data`` gives it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
KINDS = ("shard_map", "pmap")

PyTree = Any


# XLA's CPU backend (jaxlib 0.10) hands dots, reductions and convolutions to YNNPACK; with the
# convolutions left to Eigen (its weight gradients above all) the CIFAR-10 UNet's training step
# ran ~15% faster on 2 cores (experiments/benchmark.py).
_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )
}


@functools.cache
def _cpu_options_accepted() -> bool:
    try:  # an XLA without the option rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile without the options
        return False
    return True


def compiler_options(devices=None) -> dict[str, str] | None:
    """XLA compiler options for programs on ``devices`` (default: all): on CPU, convolutions by
    Eigen instead of YNNPACK (faster training); None on accelerators or where this XLA does not
    know the option. Pass to ``jax.jit(..., compiler_options=...)``."""
    devices = jax.devices() if devices is None else devices
    if all(d.platform == "cpu" for d in devices) and _cpu_options_accepted():
        return dict(_CPU_COMPILER_OPTIONS)
    return None


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all), ordered by process."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


class DataParallel:
    """Runs a per-device step over every device of a mesh with ``shard_map`` or ``pmap``.

    Attributes:
      kind: ``"shard_map"`` or ``"pmap"``.
      mesh: the 1-D ``"data"`` mesh.
      num_devices: devices of the job; ``num_local_devices``: of this process.
    """

    def __init__(self, kind: str = "shard_map", mesh: Mesh | None = None):
        if kind not in KINDS:
            raise ValueError(f"parallel={kind!r} is unknown; expected one of {list(KINDS)}")
        self.kind = kind
        self.mesh = make_mesh() if mesh is None else mesh
        self.devices = list(self.mesh.devices.flat)
        self.num_devices = len(self.devices)
        pid = jax.process_index()
        self.local_devices = [d for d in self.devices if d.process_index == pid]
        self.num_local_devices = len(self.local_devices)
        self.replicated = NamedSharding(self.mesh, P())
        self._stacked = NamedSharding(self.mesh, P(AXIS))

    # ------------------------------------------------------------------ state layout

    def from_replicated(self, state: PyTree) -> PyTree:
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

    def to_replicated(self, state: PyTree) -> PyTree:
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

    def replicate_host(self, tree: PyTree) -> PyTree:
        """Host (numpy) values, identical on every process -> replicated global arrays."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree
        )

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

        def put(x):
            x = np.asarray(x)
            k, local_b = x.shape[:2]
            if local_b % self.num_local_devices:
                raise ValueError(
                    f"local batch of {local_b} rows is not divisible by the "
                    f"{self.num_local_devices} local devices"
                )
            if self.kind == "shard_map":
                sharding = NamedSharding(self.mesh, P(None, AXIS))
                shape = (k, local_b * self.num_devices // self.num_local_devices, *x.shape[2:])
                return jax.make_array_from_process_local_data(sharding, x, shape)
            per = local_b // self.num_local_devices
            x = x.reshape(k, self.num_local_devices, per, *x.shape[2:]).swapaxes(0, 1)
            shape = (self.num_devices, k, per, *x.shape[3:])
            return jax.make_array_from_process_local_data(self._stacked, x, shape)

        return {name: put(x) for name, x in local_batch.items()}

    # ------------------------------------------------------------------ the step

    def wrap(
        self, step_fn: Callable[[PyTree, dict], tuple[PyTree, dict]], *, donate: bool = True
    ) -> Callable[[PyTree, dict], tuple[PyTree, dict]]:
        """Maps ``step_fn`` over all devices and scans it over the leading ``k`` batch axis.

        Args:
          step_fn: the per-device step (uses ``lax.pmean(..., "data")``).
          donate: donate the input state's buffers.

        Returns:
          ``fn(state, batch) -> (state, metrics)`` taking the layouts of
          :meth:`from_replicated` and :meth:`shard_batch`; metric leaves are ``[k]`` (shard_map,
          replicated) or ``[D, k]`` (pmap); read them with :meth:`metrics_to_host`.
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
        options = compiler_options(self.devices)
        return jax.jit(mapped, donate_argnums=donate_argnums, compiler_options=options)

    def metrics_to_host(self, metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """Metric leaves (identical on every device) -> numpy ``[k]`` from a local device."""

        def get(x):
            local = np.asarray(x.addressable_shards[0].data)
            return local[0] if self.kind == "pmap" else local

        return {name: get(x) for name, x in metrics.items()}


__all__ = ["AXIS", "KINDS", "DataParallel", "compiler_options", "make_mesh"]
