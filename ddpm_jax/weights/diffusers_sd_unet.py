"""A diffusers ``UNet2DConditionModel`` folder (Stable Diffusion 1.x / 2.x) in our :class:`SDUNet`.

The folder (``unet/`` of a pipeline) holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin`` (read without torch). ``config.json`` maps
onto :class:`~ddpm_jax.models.sd_unet.SDUNet` (:func:`sd_unet_from_config`); a key the file
leaves out takes diffusers' default (:data:`SD_UNET_DEFAULTS`, diffusers 0.42):

- ``block_out_channels``, ``layers_per_block`` (an int or one per level), ``norm_num_groups``,
  ``norm_eps``, ``cross_attention_dim`` (an int), ``in_channels`` / ``out_channels``,
  ``flip_sin_to_cos``, ``freq_shift``, ``downsample_padding`` (0 or 1);
- ``down_block_types`` ``CrossAttnDownBlock2D`` / ``DownBlock2D`` and ``up_block_types``
  ``CrossAttnUpBlock2D`` / ``UpBlock2D`` → which levels have spatial transformers;
- ``attention_head_dim`` (an int or one per level) is, as in diffusers (its issue #2011), the
  number of *heads* of each level's transformers;
- ``use_linear_projection`` (1x1 convolutions or linear layers as ``proj_in/out``: the same
  function, the weights' shapes are checked against it) and ``upcast_attention`` (our logits and
  softmax are always float32);
- required as :class:`SDUNet` computes (:data:`REQUIRED_SD_UNET_VALUES`; anything else, e.g.
  SDXL's ``addition_embed_type``, raises one line naming the key): no class or additional
  embeddings, one transformer layer per block, ``UNetMidBlock2DCrossAttn``, silu, ...;
- ignored: keys starting with ``_`` (``_class_name`` must be ``UNet2DConditionModel``),
  ``sample_size`` (kept as the latent size the model was trained at) and
  ``addition_embed_type_num_heads`` (used only with an addition embedding). Unknown keys raise.

Parameter names map one to one (:func:`sd_unet_torch_name`); layouts convert as for the VAE.

Example:
    >>> spec, variables = read_sd_unet_folder("stable-diffusion-v1-5/unet")
    >>> eps = spec.module.apply(variables, latents, t, context)  # [B, 64, 64, 4], [B], [B, 77, 768]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UsageError
from ddpm_jax.models.sd_unet import SDUNet
from ddpm_jax.weights.diffusers import (
    convert_state_dict,
    find_model_files,
    read_config,
    read_state_dict,
)

# diffusers' UNet2DConditionModel.__init__ defaults (0.42), for keys a config.json leaves out.
SD_UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Keys whose value must be the one SDUNet computes: key -> allowed values.
REQUIRED_SD_UNET_VALUES = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "act_fn": ("silu", "swish"),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "use_linear_projection": (False, True),
    "upcast_attention": (False, True),
    "flip_sin_to_cos": (False, True),
    "downsample_padding": (0, 1),
}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


class SDUNetSpec(NamedTuple):
    """A ``UNet2DConditionModel`` config read for :class:`SDUNet`.

    Attributes:
        module: the :class:`SDUNet` (unbound).
        in_channels: latent channels C of its input [B, H, W, C].
        sample_size: latent ``(H, W)`` the model was trained at, or None.
        linear_projection: the checkpoint's ``proj_in/out`` are linear layers (else 1x1 convs).
    """

    module: SDUNet
    in_channels: int
    sample_size: tuple[int, int] | None
    linear_projection: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(value, allowed) -> bool:
    """``value in allowed`` with booleans and numbers kept apart (``False != 0`` here)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def _per_level(key, value, levels, source) -> tuple[int, ...]:
    """An int or a list of ``levels`` positive ints → a tuple of ``levels`` ints."""
    values = [value] * levels if _is_int(value) else value
    if not isinstance(values, list | tuple) or len(values) != levels:
        raise UsageError(f"{source}: {key}={value!r}: must be an int or a list of {levels} ints")
    if not all(_is_int(v) and v > 0 for v in values):
        raise UsageError(f"{source}: {key}={value!r}: must be positive ints")
    return tuple(values)


def _block_types(key, types, allowed, source) -> tuple[bool, ...]:
    if not isinstance(types, list | tuple) or any(t not in allowed for t in types):
        raise UsageError(f"{source}: {key}={types!r}: our SD UNet implements {tuple(allowed)} only")
    return tuple(allowed[t] for t in types)


def sd_unet_from_config(config: dict, *, source: str = "config.json") -> SDUNetSpec:
    """Maps a diffusers ``UNet2DConditionModel`` ``config.json`` dict onto :class:`SDUNet`.

    Args:
        config: the parsed ``config.json``; missing keys take :data:`SD_UNET_DEFAULTS`.
        source: names the config in messages (the file).

    Returns:
        The :class:`SDUNetSpec`.

    Raises:
        UsageError: one line naming the first unknown key or value :class:`SDUNet` does not
            compute.
    """
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise UsageError(f"{source}: _class_name={cls!r}: expected UNet2DConditionModel")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in SD_UNET_DEFAULTS)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {unknown} for a UNet2DConditionModel")
    c = {**SD_UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key in ("transformer_layers_per_block", "only_cross_attention"):  # one value per level
        if (
            isinstance(c[key], list | tuple)
            and c[key]
            and all(_same(v, c[key][:1]) for v in c[key])
        ):
            c[key] = c[key][0]
    for key, allowed in REQUIRED_SD_UNET_VALUES.items():
        if not _same(c[key], allowed):
            raise UsageError(
                f"{source}: {key}={c[key]!r} is not supported by our SD UNet (supported: "
                f"{' or '.join(map(repr, allowed))})"
            )
    widths = c["block_out_channels"]
    if not isinstance(widths, list | tuple) or not widths:
        raise UsageError(f"{source}: block_out_channels={widths!r}: must be a list of ints")
    levels = len(widths)
    widths = _per_level("block_out_channels", list(widths), levels, source)
    down = _block_types("down_block_types", c["down_block_types"], _DOWN_TYPES, source)
    up = _block_types("up_block_types", c["up_block_types"], _UP_TYPES, source)
    if len(down) != levels or len(up) != levels:
        raise UsageError(
            f"{source}: down_block_types has {len(down)} entries, up_block_types {len(up)}, "
            f"block_out_channels {levels}: they must agree"
        )
    for key in ("cross_attention_dim", "norm_num_groups", "in_channels", "out_channels"):
        if not (_is_int(c[key]) and c[key] > 0):
            raise UsageError(f"{source}: {key}={c[key]!r}: our SD UNet needs a positive int")
    for key in ("norm_eps", "freq_shift"):
        if not isinstance(c[key], int | float) or isinstance(c[key], bool):
            raise UsageError(f"{source}: {key}={c[key]!r}: must be a number")
    if c["time_embedding_dim"] not in (None, 4 * widths[0]):
        raise UsageError(
            f"{source}: time_embedding_dim={c['time_embedding_dim']!r}: our SD UNet's is 4 * "
            f"block_out_channels[0] = {4 * widths[0]}"
        )
    heads = _per_level("attention_head_dim", c["attention_head_dim"], levels, source)
    try:
        module = SDUNet(
            block_out_channels=widths,
            layers_per_block=_per_level("layers_per_block", c["layers_per_block"], levels, source),
            down_attention=down,
            up_attention=up,
            num_heads=heads,
            context_dim=c["cross_attention_dim"],
            out_channels=c["out_channels"],
            num_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]),
            flip_sin_to_cos=c["flip_sin_to_cos"],
            freq_shift=float(c["freq_shift"]),
            downsample_padding=c["downsample_padding"],
        )
    except ValueError as e:
        raise UsageError(f"{source}: {' '.join(str(e).split())}") from e
    size = c["sample_size"]
    hw = None if size is None else tuple(size) if isinstance(size, list | tuple) else (size, size)
    return SDUNetSpec(module, c["in_channels"], hw, c["use_linear_projection"])


_LIST = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers)_(\d+)")
# Names inside our SpatialTransformer → diffusers' Transformer2DModel (one transformer block).
_TRANSFORMER = {
    "norm1": "transformer_blocks.0.norm1",
    "norm2": "transformer_blocks.0.norm2",
    "norm3": "transformer_blocks.0.norm3",
    "attn1": "transformer_blocks.0.attn1",
    "attn2": "transformer_blocks.0.attn2",
    "to_out": "to_out.0",
    "ff_in": "transformer_blocks.0.ff.net.0.proj",
    "ff_out": "transformer_blocks.0.ff.net.2",
}


def sd_unet_torch_name(path: tuple[str, ...]) -> str:
    """Flax parameter path of :class:`SDUNet` → diffusers ``UNet2DConditionModel`` key.

    E.g. ``('down_blocks_0_attentions_1', 'attn2', 'to_out', 'kernel')`` →
    ``'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight'``,
    ``('time_embedding_linear_1', 'bias')`` → ``'time_embedding.linear_1.bias'``; leaves other than
    ``bias`` (kernels, norm scales) are ``weight``.
    """
    top, *inner, leaf = path
    if top.startswith("time_embedding_"):
        name = "time_embedding." + top[len("time_embedding_") :]
    else:
        name = re.sub(r"\.(\d+)_", r".\1.", _LIST.sub(r"\1.\2", top))
        name = name.replace("mid_block_", "mid_block.")
    if "attentions" in top:
        inner = [_TRANSFORMER.get(p, p) for p in inner]
    return ".".join([name, *inner, "bias" if leaf == "bias" else "weight"])


def convert_sd_unet_weights(
    spec: SDUNetSpec, state_dict: Mapping[str, np.ndarray], *, source: str = "weights"
) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict → ``{"params": ...}`` of ``spec.module``.

    Every weight of the file must be used and every parameter assigned.

    Raises:
        UsageError: naming missing, unexpected or misshaped keys, or ``proj_in`` weights whose
            shape contradicts ``use_linear_projection``.
    """
    module = spec.module
    factor = 2 ** (len(module.block_out_channels) - 1)
    x = jnp.zeros((1, factor, factor, spec.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, module.context_dim), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, context))
    ndim = 2 if spec.linear_projection else 4
    for key, value in state_dict.items():
        if key.endswith(("proj_in.weight", "proj_out.weight")) and np.ndim(value) != ndim:
            raise UsageError(
                f"{source}: {key!r} has shape {np.shape(value)}, but use_linear_projection="
                f"{spec.linear_projection} in config.json asks for a "
                f"{'linear layer' if ndim == 2 else '1x1 convolution'}"
            )
    params = convert_state_dict(
        shapes["params"], state_dict, source=source, name_fn=sd_unet_torch_name
    )
    return {"params": params}


def read_sd_unet_folder(directory: str | Path) -> tuple[SDUNetSpec, dict]:
    """Loads a diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x) into :class:`SDUNet`.

    Args:
        directory: a ``unet/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
            or ``.bin``), or a pipeline folder holding one.

    Returns:
        ``(spec, variables)``: ``spec.module.apply(variables, x, t, context)`` maps latents ``x``
        [B, H, W, C] NHWC, ``t`` int32 [B] and ``context`` [B, M, cross_attention_dim] to the
        prediction [B, H, W, out_channels] (diffusers' output transposed to NHWC).

    Raises:
        UsageError: a missing or damaged file, a config value our SD UNet does not compute,
            missing / unexpected / misshaped weights (one line naming the file and the key).
    """
    config_path, weights_path = find_model_files(directory, "unet")
    spec = sd_unet_from_config(read_config(config_path), source=str(config_path))
    state_dict = read_state_dict(weights_path)
    return spec, convert_sd_unet_weights(spec, state_dict, source=str(weights_path))
