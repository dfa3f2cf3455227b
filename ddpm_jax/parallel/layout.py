"""What every parallel layout shares: the mesh axes, the compiler options, device order, and the
:class:`Layout` base class (a global batch sharded over all devices, host values, metrics).

A layout answers, for one mesh of all devices of the job: where the training state lives
outside the step (:meth:`Layout.state_shardings`, what checkpoints are written from and restored
into), what the compiled step takes (:meth:`Layout.to_step` / :meth:`Layout.from_step`), how a
batch is placed (:meth:`Layout.shard_batch`) and how the step is compiled (``wrap``, in the
subclasses). The run loop talks only to these methods.

Devices are ordered by (process, id) and the batch axes of the mesh are flattened in that order,
so process ``p`` of ``P`` owns rows ``[p B/P, (p+1) B/P)`` of every global batch, exactly the rows
``ddpm_jax.data`` gives it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"  # the batch axis of every mesh (and the pmean axis of per-device steps)
FSDP_AXIS = "fsdp"  # the second axis of the FSDP mesh: parameters are sharded over it

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


def ordered_devices(devices=None) -> list:
    """``devices`` (default: all of the job) sorted by (process, id)."""
    devices = jax.devices() if devices is None else list(devices)
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all), ordered by process."""
    return Mesh(np.array(ordered_devices(devices)), (AXIS,))


def state_bytes(tree: PyTree) -> dict[str, int]:
    """Bytes of a pytree of arrays (or of ``ShapeDtypeStruct`` with shardings) per device.

    Concrete arrays are measured from their addressable shards (what this process's devices
    really hold); abstract ones from ``sharding.shard_shape``.

    Returns:
      ``total`` (bytes of the logical arrays), ``per_device`` (the most any one device holds),
      ``replicated`` (bytes of the leaves every device holds whole).
    """
    total, replicated, per_device = 0, 0, {}
    for leaf in jax.tree.leaves(tree):
        size = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        total += size
        sharding = leaf.sharding
        if sharding.is_fully_replicated:
            replicated += size
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        else:
            shard = int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64))
            for device in sharding.device_set:
                per_device[device] = per_device.get(device, 0) + shard * leaf.dtype.itemsize
    return dict(total=total, per_device=max(per_device.values(), default=0), replicated=replicated)


def _identity(tree: PyTree) -> PyTree:
    return tree


class Layout:
    """The part of a parallel layout that does not depend on how the state is laid out.

    Args:
      mesh: a mesh of all devices of the job, devices ordered by (process, id).
      batch_axes: the mesh axes the batch dimension is sharded over (all of the mesh's axes).

    Attributes:
      kind: the ``config.parallel`` value of the layout.
      mesh: the mesh; ``batch_axes``: the axes the batch is sharded over.
      devices: the mesh's devices in batch order; ``num_devices``: their count.
      local_devices / num_local_devices: those of this process.
      replicated: ``NamedSharding(mesh, P())``.
      batch_sharding: a leading batch axis sharded over all devices (sampling rounds).
    """

    kind: str
    global_view = False  # whether ``wrap`` runs the step on the global batch (else per device)

    def __init__(self, mesh: Mesh, batch_axes: str | tuple[str, ...]):
        self.mesh = mesh
        self.batch_axes = batch_axes
        self.devices = list(mesh.devices.flat)
        self.num_devices = len(self.devices)
        pid = jax.process_index()
        self.local_devices = [d for d in self.devices if d.process_index == pid]
        self.num_local_devices = len(self.local_devices)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(batch_axes))
        self._gather = jax.jit(_identity, out_shardings=self.replicated)  # compiled per tree

    # ------------------------------------------------------------------ state layout

    def state_shardings(self, tree: PyTree) -> PyTree:
        """The sharding of every leaf of a state outside the step (checkpoints, init, restore).

        Args:
          tree: arrays or ``ShapeDtypeStruct`` (only shapes are read).

        Returns:
          A pytree of ``NamedSharding`` of the same structure (here: all replicated).
        """
        return jax.tree.map(lambda _: self.replicated, tree)

    def to_step(self, state: PyTree) -> PyTree:
        """The state's layout outside the step -> the layout the wrapped step takes."""
        return state

    def from_step(self, state: PyTree) -> PyTree:
        """The wrapped step's state layout -> the layout of :meth:`state_shardings`."""
        return state

    def gather(self, tree: PyTree) -> PyTree:
        """Arrays on this mesh in any sharding -> replicated global arrays (one all-gather for
        the sharded leaves; replicated leaves are returned as they are)."""
        leaves = jax.tree.leaves(tree)
        if all(not isinstance(x, jax.Array) or x.is_fully_replicated for x in leaves):
            return tree  # replicated already, or host values (jit places them)
        return self._gather(tree)

    def replicate_host(self, tree: PyTree) -> PyTree:
        """Host (numpy) values, identical on every process -> replicated global arrays."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree
        )

    # ------------------------------------------------------------------ the step

    def map_grads(self, grad_fn: Callable) -> Callable:
        """How this layout reduces gradients: ``grad_fn(params, step, rows) -> (loss, grads)``
        of one device's rows -> the loss and gradient averaged over the global batch, inside
        the step :meth:`wrap` compiles (``ddpm_jax.state.make_train_step``'s ``map_grads``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ batches

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays laid out for the wrapped step.

        Args:
          local_batch: leaves ``[k, local_B, ...]`` (``k`` steps, ``local_B`` rows of this
            process, divisible by its device count).

        Returns:
          ``[k, B, ...]`` sharded on axis 1 over all devices; device ``j`` of :attr:`devices`
          receives global rows ``[j B/D, (j+1) B/D)``.
        """
        sharding = NamedSharding(self.mesh, P(None, self.batch_axes))

        def put(x):
            x = self._check_rows(x)
            shape = (x.shape[0], x.shape[1] * self.num_devices // self.num_local_devices)
            return jax.make_array_from_process_local_data(sharding, x, (*shape, *x.shape[2:]))

        return {name: put(x) for name, x in local_batch.items()}

    def _check_rows(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[1] % self.num_local_devices:
            raise ValueError(
                f"local batch of {x.shape[1]} rows is not divisible by the "
                f"{self.num_local_devices} local devices"
            )
        return x

    def metrics_to_host(self, metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """Metric leaves (replicated ``[k]``) -> numpy ``[k]`` from a local device."""
        return {name: np.asarray(x.addressable_shards[0].data) for name, x in metrics.items()}


__all__ = [
    "AXIS",
    "FSDP_AXIS",
    "Layout",
    "compiler_options",
    "make_mesh",
    "ordered_devices",
    "state_bytes",
]
