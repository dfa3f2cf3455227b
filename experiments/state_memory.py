"""Memory per device of the training state and of the compiled training step, per parallel layout.

Compile-only: the state is ``builders.abstract_state`` (shapes and the layout's shardings) and the
step is the engine's (``builders.build_train_step``), lowered and compiled for one step of the
config's global batch; nothing is allocated, so a billion-parameter UNet is measured on a CPU
with simulated devices::

    python -m experiments.state_memory --devices=8 --config.model.ch=512
    python -m experiments.state_memory --devices=8 --layouts=shard_map,fsdp,fsdp:4

``--config`` is the CIFAR-10 recipe (``experiments.cifar``) with its flags; ``--layouts`` lists
``shard_map`` and ``fsdp`` (``fsdp:K`` sets ``mesh.fsdp=K``); pmap lays the state out as
shard_map does. For each layout it prints (bytes per device):

- ``state``: the state's bytes on the most loaded device, from the shardings, and ``replicated``:
  those of the leaves every device holds whole;
- ``step peak``: the buffers of the compiled step (state, batch, activations, gathered
  parameters, gradients; ``compiled.memory_analysis()``: arguments + outputs not aliased to the
  donated state + temporaries);
- ``init peak``: the same for the sharded initialisation (``builders.init_state``).

On CPU the peak is the CPU backend's buffer assignment: accelerators fuse and schedule
differently, so read it as an estimate; the state bytes are exact on every backend.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli
from ddpm_jax.errors import UsageError
from experiments import cifar

MEASURED_KINDS = ("shard_map", "fsdp")


def _peak(compiled) -> int:
    """Bytes per device of a compiled program's buffers: arguments, outputs that do not reuse a
    donated argument, and temporaries (XLA's buffer assignment; the CPU backend's own
    ``peak_memory_in_bytes`` counts only the arguments)."""
    m = compiled.memory_analysis()
    out = m.output_size_in_bytes - m.alias_size_in_bytes
    return int(m.argument_size_in_bytes + out + m.temp_size_in_bytes)


def _sizes(config: ml_collections.ConfigDict, image_shape, num_classes) -> dict[str, Any]:
    """The compile-only measurement of one layout (``config.parallel``, ``config.mesh``)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ddpm_jax import builders, parallel

    dp = builders.build_parallel(config)
    model = builders.build_model(config, num_classes)
    optimizer, lr_schedule = builders.build_optimizer(config)
    init = builders.init_state_fn(config, model, optimizer, image_shape)
    abstract = builders.abstract_state(init, dp)
    schedule = builders.build_schedule(config)
    step = builders.build_train_step(config, model, schedule, optimizer, lr_schedule, dp)
    b = config.train.batch_size
    rows = NamedSharding(dp.mesh, P(None, dp.batch_axes))
    batch = {
        "image": jax.ShapeDtypeStruct((1, b, *image_shape), np.float32, sharding=rows),
        "label": jax.ShapeDtypeStruct((1, b), np.int32, sharding=rows),
        "index": jax.ShapeDtypeStruct((1, b), np.int32, sharding=rows),
    }
    start = time.time()
    step_memory = _peak(step.lower(abstract, batch).compile())
    compile_s = time.time() - start
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    init_memory = _peak(jax.jit(init, out_shardings=shardings).lower().compile())
    state = parallel.state_bytes(abstract)
    return dict(
        layout=dp.kind,
        devices=dp.num_devices,
        fsdp=getattr(dp, "fsdp", None),
        params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
        state_total=state["total"],
        state_per_device=state["per_device"],
        state_replicated=state["replicated"],
        step_peak=step_memory,
        init_peak=init_memory,
        compile_s=compile_s,
    )


def measure(
    config: ml_collections.ConfigDict, layouts: Sequence[str] = MEASURED_KINDS
) -> list[dict[str, Any]]:
    """Per-device bytes of the state and peak memory of one training step, for each layout.

    Args:
      config: a training config (its model, data shape, optimizer and global batch).
      layouts: ``"shard_map"``, ``"fsdp"`` or ``"fsdp:K"`` (``mesh.fsdp = K``).

    Returns:
      One dict per layout: ``layout, devices, fsdp`` (the fsdp axis size or None), ``params``
      (count), ``state_total, state_per_device, state_replicated, step_peak, init_peak`` (bytes)
      and ``compile_s``.

    Raises:
      UsageError: an unknown layout or an invalid config for this device count.
    """
    import jax

    from ddpm_jax import builders
    from ddpm_jax import config as config_lib

    out = []
    for layout in layouts:
        kind, _, k = layout.partition(":")
        if kind not in MEASURED_KINDS or (k and kind != "fsdp") or (k and not k.isdigit()):
            raise UsageError(f"--layouts: {layout!r} is not one of shard_map, fsdp, fsdp:K")
        c = config.copy_and_resolve_references()
        c.parallel, c.mesh.fsdp = kind, int(k) if k else c.mesh.fsdp
        config_lib.validate(c, device_count=jax.device_count(), process_count=1)
        image_shape, num_classes = builders.data_spec(c)
        out.append(_sizes(c, image_shape, num_classes))
    return out


def _size(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.2f} {units[0]}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`measure`'s rows."""
    lines = [
        "| layout | devices | state / device | replicated | step peak / device | "
        "init peak / device |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["layout"] if r["fsdp"] is None else f"fsdp (axis {r['fsdp']})"
        cells = [name, str(r["devices"]), _size(r["state_per_device"])]
        cells += [
            _size(r["state_replicated"]),
            _size(r["step_peak"]),
            _size(r["init_peak"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    lines.append(
        f"\n{r['params']:,} parameters; the whole state: {_size(r['state_total'])} "
        "(parameters, two Adam moments, EMA; float32)"
    )
    return "\n".join(lines)


def _define_flags(config: ml_collections.ConfigDict, argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_integer("devices", 8, "Simulated CPU devices (CPU only).", flag_values=fv)
    flags.DEFINE_list("layouts", list(MEASURED_KINDS), "Layouts to measure.", flag_values=fv)
    config_flags.DEFINE_config_dict(
        "config", config, "The training config.", flag_values=fv, sys_argv=list(argv)
    )
    return fv


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parses flags, measures every layout and prints the table; returns the rows."""
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        sys.exit(0)
    return cli.guarded(_main, argv)


def _main(argv: list[str]) -> list[dict[str, Any]]:
    fv = _define_flags(cifar.get_config(), argv)
    try:
        extra = fv(argv)[1:]
    except flags.Error as e:
        raise UsageError(f"bad command line: {e}") from None
    if extra:
        raise UsageError(f"unexpected positional arguments {extra}")

    import jax

    if "device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", fv.devices)  # before the backend starts
    rows = measure(fv.config, fv.layouts)
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
