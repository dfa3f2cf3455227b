"""The benchmark's ``sd15`` section (``--preset sd15``, issue #25): the memory of Stable Diffusion
1.5's UNet (860M parameters, 512x512 images = 64x64x4 latents), compile-only, and the seconds of
one denoising step on this machine where asked for.

The UNet is diffusers' ``UNet2DConditionModel`` config of ``runwayml/stable-diffusion-v1-5``
(:data:`UNETS`; ``--sd-unet test`` is a scaled-down one for the tests) built by
``ddpm_jax.weights.diffusers_sd_unet.sd_unet_from_config`` into our ``SDUNet``; its parameters
exist only as shapes (``jax.eval_shape``). Rows:

- ``params``: the parameter count, bytes in float32 and bfloat16, and the training state's
  (params + Adam's two moments + EMA, float32: 16 bytes per parameter).
- ``sample`` per ``--layouts`` and ``--dtype``: one guided denoising step (classifier-free
  guidance: the UNet on ``[uncond, cond]``, i.e. 2 x ``--sd-batch`` latents per device, with
  [., 77, 768] contexts, then the DDIM update), ``jax.jit`` over every device with the
  parameters stored in the compute dtype, replicated (``shard_map``: what each device of a data
  parallel sampler holds) or sharded as ``fsdp`` shards the state (XLA gathers them).
- ``train`` per ``--layouts`` and ``--dtype``: a fine-tuning step of the UNet with the text
  encoder frozen (its contexts precomputed: a constant table of a prompt's and the empty
  prompt's [77, 768] contexts, indexed by the label as ``PromptUNet`` indexes prompts, with the
  config's label dropout): ``state.make_train_step`` (ε loss, gradients, clipping, Adam, EMA)
  wrapped by the layout of ``builders.build_parallel`` (the engine's training step), at
  ``--sd-batch`` latents per device; parameters and optimizer state float32.

Both report XLA's ``memory_analysis`` per device (``step_memory_mb`` = arguments + outputs +
temporaries - aliased, and the terms), ``state_mb`` (what the layout keeps on each device) and
``compile_s``; a configuration that fails to compile is a row with its ``error``. ``--sd-rows``
chooses the rows (default ``params,sample,train``); ``time``: the guided step (batch 1, float32)
compiled for one device and run ``--sd-time-steps`` times, ``step_s`` their median. ``--preset
sd15`` asks XLA for cheap code generation (``benchmark.TINY_XLA_FLAGS``: LLVM's effort only, the
HLO passes and buffer assignment that give the memory are the same) on 8 simulated devices, so
time it without the preset: ``--sections sd15 --sd-rows time``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import builders, parallel, state as state_lib
from ddpm_jax.config import default_config
from ddpm_jax.models.layers import DTYPES
from ddpm_jax.parallel import compiler_options
from ddpm_jax.weights.diffusers_sd_unet import sd_unet_from_config
from experiments import measure

# unet/config.json of runwayml/stable-diffusion-v1-5 (the keys that differ from the defaults of
# diffusers' UNet2DConditionModel are all here).
SD15 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
UNETS = {
    "sd15": SD15,
    "test": dict(SD15, block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=2,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], cross_attention_dim=32,
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8),
}  # fmt: skip
CONTEXT_LEN = 77
COLUMNS = (
    "what", "unet", "layout", "dtype", "devices", "batch_per_device", "params_M",
    "params_mb_float32", "params_mb_bfloat16", "state_mb", "state_total_mb", "step_memory_mb",
    "memory_argument_mb", "memory_output_mb", "memory_temp_mb", "compile_s", "step_s", "step_s_min",
    "step_s_max", "error",
)  # fmt: skip


def _rows(text: str) -> str:
    bad = set(text.split(",")) - {"params", "sample", "train", "time"}
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {sorted(bad)}; allowed: sample,train,time")
    return text


def add_arguments(p) -> None:
    """The section's flags on the benchmark's parser."""
    positive = measure.positive_int
    p.add_argument("--sd-unet", choices=tuple(UNETS), default="sd15", help="sd15: the UNet")
    p.add_argument("--sd-batch", type=positive, default=1, help="sd15: latents per device")
    p.add_argument("--sd-rows", type=_rows, default="params,sample,train", help="sd15: rows")
    p.add_argument("--sd-time-steps", type=positive, default=1, help="sd15: timed guided steps")


class _Unet:
    """The UNet of ``name`` and its input shapes."""

    def __init__(self, name: str):
        spec = sd_unet_from_config(UNETS[name], source=f"{name} config")
        self.name, self.module = name, spec.module
        self.latent = (*spec.sample_size, spec.in_channels)
        self.context = (CONTEXT_LEN, spec.module.context_dim)

    def inputs(self, b: int):
        return (jnp.zeros((b, *self.latent)), jnp.zeros((b,), jnp.int32),
                jnp.zeros((b, *self.context)))  # fmt: skip

    def init(self, module=None):
        return (module or self.module).init(jax.random.key(0), *self.inputs(1))


def _memory(state, dp, compiled, compile_s: float) -> dict:
    """The row's figures: the state's MiB per device and in all, and the compiled step's."""
    b = parallel.state_bytes(state)
    return dict(
        state_mb=b["per_device"] / 2**20, state_total_mb=b["total"] / 2**20, compile_s=compile_s,
        devices=dp.num_devices, **measure.memory_stats(compiled),
    )  # fmt: skip


def _config(layout: str, global_batch: int):
    config = default_config()
    config.parallel, config.train.batch_size = layout, global_batch
    return config


def _sample_fn(module, scale: float = 7.5):
    """One guided DDIM step: ``(params, x [B, h, w, c], t [B], context [B, L, D],
    a_t, a_prev) -> x_prev`` with the empty prompt's context zeros."""

    def step(params, x, t, context, a_t, a_prev):
        both = module.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                            jnp.concatenate([jnp.zeros_like(context), context]))  # fmt: skip
        uncond, cond = jnp.split(both, 2)
        eps = uncond + scale * (cond - uncond)
        x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

    return step


def _sample_row(u: _Unet, layout: str, dtype: str, b: int) -> dict:
    dp = builders.build_parallel(_config(layout, b * jax.device_count()))
    module = u.module.clone(dtype=DTYPES[dtype])
    shapes = jax.eval_shape(lambda: u.init(module))
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[dtype]), shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, dp.state_shardings(shapes))  # fmt: skip
    rows = lambda shape, dt: jax.ShapeDtypeStruct(
        (b * dp.num_devices, *shape), dt, sharding=dp.batch_sharding
    )
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=dp.replicated)
    args = (params, rows(u.latent, jnp.float32), rows((), jnp.int32),
            rows(u.context, jnp.float32), scalar, scalar)  # fmt: skip
    fn = jax.jit(_sample_fn(module), compiler_options=compiler_options())
    compiled, compile_s = measure.compile_timed(fn, *args)
    return _memory(params, dp, compiled, compile_s)


def _train_row(u: _Unet, layout: str, dtype: str, b: int) -> dict:
    config = _config(layout, b * jax.device_count())
    config.model.dtype = dtype
    dp = builders.build_parallel(config)
    module = u.module.clone(dtype=DTYPES[dtype])
    optimizer, lr_schedule = builders.build_optimizer(config)
    init = lambda: state_lib.create_train_state(u.init(module), optimizer)
    abstract = builders.abstract_state(init, dp)
    rng = np.random.default_rng(0)  # the precomputed contexts: a prompt's, the empty prompt's
    table = (rng.standard_normal((2, *u.context)) * np.array([[[1.0]], [[0.0]]])).astype(np.float32)

    def apply_fn(params, x_t, t, y=None, rng=None, example_index=None):
        return module.apply(params, x_t, t, jnp.asarray(table)[y])

    step_fn = state_lib.make_train_step(
        apply_fn, builders.build_schedule(config), optimizer, builders.step_settings(config),
        map_grads=dp.map_grads, lr_schedule=lr_schedule, null_label=1,
    )  # fmt: skip
    fn = dp.wrap(step_fn)
    sharding = NamedSharding(dp.mesh, P(None, dp.batch_axes))
    shapes = dict(image=(u.latent, jnp.float32), label=((), jnp.int32), index=((), jnp.int32))
    batch = {k: jax.ShapeDtypeStruct((1, config.train.batch_size, *s), dt, sharding=sharding)
             for k, (s, dt) in shapes.items()}  # fmt: skip
    compiled, compile_s = measure.compile_timed(fn, abstract, batch)
    return _memory(abstract, dp, compiled, compile_s)


def _time_row(u: _Unet, repeats: int) -> dict:
    """The float32 guided step at batch 1 on one device, run ``repeats`` times."""
    shapes = jax.eval_shape(u.init)
    device = jax.devices()[0]
    params = jax.device_put(measure.random_params(shapes), device)
    x, t, context = (jax.device_put(a, device) for a in u.inputs(1))
    fn = jax.jit(_sample_fn(u.module), compiler_options=compiler_options())
    compiled, compile_s = measure.compile_timed(fn, params, x, t + 500, context, 0.5, 0.6)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t + 500, context, 0.5, 0.6))
        times.append(time.perf_counter() - start)
    return dict(layout="one device", dtype="float32", devices=1, batch_per_device=1,
                compile_s=compile_s, step_s=statistics.median(times), step_s_min=min(times),
                step_s_max=max(times), repeats=repeats)  # fmt: skip


def bench_sd15(args) -> list[dict]:
    """The rows of the section (module docstring); one configuration compiled at a time."""
    u = _Unet(args.sd_unet)
    shapes = jax.eval_shape(u.init)
    count = sum(x.size for x in jax.tree.leaves(shapes))
    common = dict(unet=u.name)
    mb = count / 2**20
    rows = [dict(common, what="params", params_M=count / 1e6, params_mb_float32=4 * mb,
                 params_mb_bfloat16=2 * mb, state_total_mb=16 * mb)]  # fmt: skip
    asked = args.sd_rows.split(",")
    for what, fn in (("sample", _sample_row), ("train", _train_row)):
        if what not in asked:
            continue
        for layout in args.layouts:
            for dtype in args.dtype:
                row = dict(common, what=what, layout=layout, dtype=dtype,
                           batch_per_device=args.sd_batch)  # fmt: skip
                try:
                    row.update(fn(u, layout, dtype, args.sd_batch))
                except Exception as e:  # noqa: BLE001 (recorded: e.g. out of memory compiling)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(f"sd15: {what} {layout} {dtype}: {measure_line(row)}", flush=True)
    if "time" in asked:
        rows.append(dict(common, what="time", **_time_row(u, args.sd_time_steps)))
    return rows


def measure_line(row: dict) -> str:
    """One progress line of a row."""
    if "error" in row:
        return row["error"]
    return (f"{row['step_memory_mb']:.0f} MiB per device (temp {row['memory_temp_mb']:.0f}), "
            f"compiled in {row['compile_s']:.1f} s")  # fmt: skip


def summary(rows: list[dict]) -> dict:
    """The section's headline figures: parameters, and MiB per device by configuration."""
    out = dict(sd15_params_M=rows[0]["params_M"])
    memory = {
        f"{r['what']} {r['layout']} {r['dtype']}": r.get("step_memory_mb")
        for r in rows
        if r["what"] in ("sample", "train")
    }
    if memory:
        out["sd15_step_memory_mb"] = memory
    for r in rows:
        if r["what"] == "time":
            out["sd15_step_s"] = r["step_s"]
    return out
