"""Parallel layouts of the training state over all devices of all processes (``config.parallel``).

===============  ========================================  =====================================
kind             state on each device                      step
===============  ========================================  =====================================
``"shard_map"``  all of it, replicated (16 B / parameter)  per-device step, ``jit(shard_map)``
``"pmap"``       all of it, a leading device axis          per-device step, ``pmap``
``"fsdp"``       ``1/K`` of the large leaves (mesh.fsdp)   global-view step, ``jit`` + shardings
===============  ========================================  =====================================

Modules: :mod:`~ddpm_jax.parallel.layout` (the mesh axes, device order, compiler options, what
every layout shares), :mod:`~ddpm_jax.parallel.data_parallel` (``shard_map``, ``pmap``),
:mod:`~ddpm_jax.parallel.fsdp` (``fsdp``: the 2-D mesh and the sharding rule). Every layout has
``state_shardings``, ``to_step`` / ``from_step``, ``gather``, ``shard_batch``, ``wrap`` and
``metrics_to_host``, and ``map_grads``: how the one training step (``ddpm_jax.state``) reduces
its gradients.
"""

from __future__ import annotations

from ddpm_jax.parallel import data_parallel, fsdp, layout
from ddpm_jax.parallel.data_parallel import DataParallel
from ddpm_jax.parallel.fsdp import FullyShardedDataParallel, make_fsdp_mesh, partition_spec
from ddpm_jax.parallel.layout import (
    AXIS,
    FSDP_AXIS,
    Layout,
    compiler_options,
    make_mesh,
    state_bytes,
)

KINDS = (*DataParallel.KINDS, fsdp.KIND)


def make(
    kind: str, *, fsdp_size: int | None = None, min_size: int = fsdp.DEFAULT_MIN_SIZE
) -> Layout:
    """The layout ``kind`` over every device of the job.

    Args:
      kind: one of :data:`KINDS`.
      fsdp_size: ``"fsdp"`` only: the size of the ``"fsdp"`` mesh axis (None: all devices).
      min_size: ``"fsdp"`` only: leaves with fewer elements stay replicated.

    Raises:
      ValueError: an unknown kind, or ``fsdp_size`` not dividing the device count.
    """
    if kind not in KINDS:
        raise ValueError(f"parallel={kind!r} is unknown; expected one of {list(KINDS)}")
    if kind == fsdp.KIND:
        return FullyShardedDataParallel(fsdp_size, min_size=min_size)
    return DataParallel(kind)


__all__ = [
    "AXIS",
    "FSDP_AXIS",
    "KINDS",
    "DataParallel",
    "FullyShardedDataParallel",
    "Layout",
    "compiler_options",
    "data_parallel",
    "layout",
    "make",
    "make_fsdp_mesh",
    "make_mesh",
    "partition_spec",
    "state_bytes",
]
