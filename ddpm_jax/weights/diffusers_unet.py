"""A diffusers ``UNet2DModel`` folder loaded into our DDPM :class:`~ddpm_jax.models.unet.UNet`.

This is how the published pixel-space DDPM checkpoints (Ho et al.'s CIFAR-10, CelebA-HQ and LSUN
models, ``google/ddpm-*``) and other diffusers ``UNet2DModel`` checkpoints load. The folder holds
``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``.bin`` (read without torch by
:mod:`ddpm_jax.weights.pth`; the original ``google/ddpm-*`` ``.bin`` files use the old attention
names ``query`` / ``key`` / ``value`` / ``proj_attn``, accepted too).

``config.json`` → :class:`UNet` (:func:`unet_from_diffusers_config`); a key missing from the file
takes diffusers' default (:data:`UNET_DEFAULTS`, those of diffusers 0.42's ``UNet2DModel``):

- ``block_out_channels`` = ``ch * ch_mult`` (``ch`` the first entry; the others must be
  multiples of it), ``layers_per_block`` → ``num_res_blocks``, ``norm_num_groups`` →
  ``num_groups``, ``out_channels``, ``dropout``;
- ``down_block_types`` ``DownBlock2D`` / ``AttnDownBlock2D`` (``UNetRes`` prefix allowed), with
  ``up_block_types`` mirroring them (``UpBlock2D`` / ``AttnUpBlock2D``): the levels with attention
  become ``attn_resolutions`` = ``sample_size / 2 ** level`` (our UNet places attention by
  feature-map height, so the loaded model equals diffusers' on inputs of height ``sample_size``;
  at another size attention moves with the resolution);
- ``attention_head_dim`` (None: one head) → ``num_heads``, the same at every attention block;
- ``resnet_time_scale_shift`` ``"default"`` / ``"scale_shift"`` → ``resblock_conditioning``
  ``"additive"`` / ``"scale_shift"`` (scale-shift also needs ``attn_norm_num_groups`` set: without
  it diffusers' middle attention has no GroupNorm, which ours always has);
- ``num_class_embeds`` = N (``class_embed_type`` None) → ``num_classes = N - 1``: our label table
  has ``num_classes + 1`` rows, so labels ``0 .. N - 1`` index the same rows as in diffusers
  (``model.null_label`` is the last one, meaningful only if the checkpoint was trained so);
- ``flip_sin_to_cos`` True is converted exactly (the two halves of the first time-embedding
  layer's input rows swap);
- required as our UNet computes (:data:`REQUIRED_UNET_VALUES`; anything else raises):
  ``freq_shift`` 1, ``norm_eps`` 1e-6, ``downsample_padding`` 0, ``mid_block_scale_factor`` 1,
  positional time embedding of width ``4 * ch``, silu, conv down/upsampling, ...;
- ignored: keys starting with ``_`` (``_class_name`` must be ``UNet2DModel``), and
  ``num_train_timesteps`` (used only by the ``"learned"`` time embedding). Any other key raises.

Parameter names map one to one (:func:`unet_torch_name`), torch layouts are converted as for the
VAE (:func:`ddpm_jax.weights.diffusers.convert_state_dict`).

Example:
    >>> unet, variables = load_diffusers_unet("ddpm-cifar10-32")
    >>> eps = unet.apply(variables, x_t, t)  # x_t: [B, 32, 32, 3], t: int32 [B] in [0, 1000)
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
from ddpm_jax.models.unet import UNet
from ddpm_jax.weights.diffusers import (
    convert_state_dict,
    find_model_files,
    read_config,
    read_state_dict,
)

# diffusers' UNet2DModel.__init__ defaults (0.42), for keys a config.json leaves out.
UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # used only by the "learned" time embedding: ignored
}
# Keys whose value must be the one our UNet computes: key -> (allowed values, why).
REQUIRED_UNET_VALUES = {
    "center_input_sample": ((False,), "inputs are used as given"),
    "time_embedding_type": (("positional",), "sinusoidal embedding only"),
    "freq_shift": ((1,), "the DDPM embedding, frequencies 10000 ** (-i / (half - 1))"),
    "mid_block_type": (("UNetMidBlock2D",), "the middle is resblock, attention, resblock"),
    "mid_block_scale_factor": ((1,), "no output rescaling"),
    "downsample_padding": ((0,), "DDPM's stride-2 convolution pads one row/column at the end"),
    "downsample_type": (("conv",), "stride-2 convolution"),
    "upsample_type": (("conv",), "nearest neighbour + convolution"),
    "act_fn": (("silu", "swish"), "swish everywhere"),
    "norm_eps": ((1e-6,), "GroupNorm epsilon 1e-6"),
    "add_attention": ((True,), "the middle block always has attention"),
    "class_embed_type": ((None,), "labels through a learned table (num_class_embeds) only"),
    "resnet_time_scale_shift": (("default", "scale_shift"), "additive or FiLM conditioning"),
    "flip_sin_to_cos": ((False, True), "either order is converted"),
}
_CONDITIONING = {"default": "additive", "scale_shift": "scale_shift"}
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type -> has attention
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _block_attention(key: str, types, allowed: dict, source: str) -> list[bool]:
    """Per block: has attention. Raises naming the first block type our UNet lacks."""
    if not isinstance(types, list | tuple):
        raise UsageError(f"{source}: {key}={types!r}: must be a list")
    out = []
    for t in types:
        name = t[len("UNetRes") :] if isinstance(t, str) and t.startswith("UNetRes") else t
        if name not in allowed:
            raise UsageError(
                f"{source}: {key} has block type {t!r}, which our UNet does not implement "
                f"(supported: {tuple(allowed)})"
            )
        out.append(allowed[name])
    return out


class DiffusersUNetConfig(NamedTuple):
    """A ``UNet2DModel`` ``config.json`` read for our UNet (:func:`unet_from_diffusers_config`).

    Attributes:
        module: the :class:`UNet` (unbound).
        in_channels: C of its input [B, H, W, C].
        sample_size: ``(H, W)`` the checkpoint was made for, or None when the config has none.
        flip_sin_to_cos: the checkpoint's time embedding is ``[cos, sin]`` (ours ``[sin, cos]``;
            :func:`convert_unet_weights` converts).
    """

    module: UNet
    in_channels: int
    sample_size: tuple[int, int] | None
    flip_sin_to_cos: bool


def unet_from_diffusers_config(config: dict, *, source: str = "config.json") -> DiffusersUNetConfig:
    """Maps a diffusers ``UNet2DModel`` ``config.json`` dict onto our :class:`UNet`.

    Args:
        config: the parsed ``config.json``; missing keys take :data:`UNET_DEFAULTS`.
        source: names the config in messages (the file).

    Returns:
        The :class:`DiffusersUNetConfig`.

    Raises:
        UsageError: one line naming the first key whose value our UNet does not implement, or an
            unknown key.
    """
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UsageError(
            f"{source}: _class_name={config['_class_name']!r}: only diffusers' UNet2DModel loads "
            "into our UNet"
        )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {unknown} for a UNet2DModel")
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, (allowed, what) in REQUIRED_UNET_VALUES.items():
        if c[key] not in allowed or isinstance(c[key], bool) != isinstance(allowed[0], bool):
            raise UsageError(
                f"{source}: {key}={c[key]!r} is not supported; our UNet needs "
                f"{' or '.join(map(repr, allowed))} ({what})"
            )

    widths = c["block_out_channels"]
    if not isinstance(widths, list | tuple) or not widths or not all(map(_is_int, widths)):
        raise UsageError(f"{source}: block_out_channels={widths!r}: must be a list of ints")
    ch, levels = widths[0], len(widths)
    if ch < 1 or any(w % ch for w in widths):
        raise UsageError(
            f"{source}: block_out_channels={list(widths)}: our UNet needs every entry to be a "
            f"positive multiple of the first ({ch})"
        )
    down = _block_attention("down_block_types", c["down_block_types"], _DOWN_TYPES, source)
    up = _block_attention("up_block_types", c["up_block_types"], _UP_TYPES, source)
    if len(down) != levels or len(up) != levels:
        raise UsageError(
            f"{source}: down_block_types has {len(down)} entries, up_block_types {len(up)}, "
            f"block_out_channels {levels}: they must agree"
        )
    if up[::-1] != down:
        raise UsageError(
            f"{source}: up_block_types={list(c['up_block_types'])} must mirror down_block_types="
            f"{list(c['down_block_types'])} (attention at the same levels)"
        )
    attn_levels = [i for i, a in enumerate(down) if a]
    size = c["sample_size"]
    hw = tuple(size) if isinstance(size, list | tuple) else (size, size)
    if (size is not None or attn_levels) and not (
        len(hw) == 2 and all(_is_int(n) and n > 0 and n % 2 ** (levels - 1) == 0 for n in hw)
    ):
        raise UsageError(
            f"{source}: sample_size={size!r}: must be an int or [H, W] divisible by "
            f"2 ** {levels - 1} (it places attention: AttnDownBlock2D at levels {attn_levels})"
        )
    attn_resolutions = tuple(hw[0] // 2**i for i in attn_levels)

    head_dim = c["attention_head_dim"]
    attn_widths = sorted({*(widths[i] for i in attn_levels), widths[-1]})  # the middle too
    heads = {1} if head_dim is None else set()
    if _is_int(head_dim) and head_dim > 0 and not any(w % head_dim for w in attn_widths):
        heads = {w // head_dim for w in attn_widths}
    if len(heads) != 1:
        raise UsageError(
            f"{source}: attention_head_dim={head_dim!r} must split every attention width "
            f"{attn_widths} into the same number of heads (our UNet has one head count)"
        )
    conditioning = _CONDITIONING[c["resnet_time_scale_shift"]]
    groups, attn_groups = c["norm_num_groups"], c["attn_norm_num_groups"]
    if attn_groups not in (None, groups) or (conditioning == "scale_shift" and attn_groups is None):
        raise UsageError(
            f"{source}: attn_norm_num_groups={attn_groups!r} with resnet_time_scale_shift="
            f"{c['resnet_time_scale_shift']!r}: our middle attention always has a GroupNorm of "
            f"norm_num_groups={groups} groups"
        )
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise UsageError(
            f"{source}: time_embedding_dim={c['time_embedding_dim']!r}: our UNet's is 4 * "
            f"block_out_channels[0] = {4 * ch}"
        )
    num_classes = c["num_class_embeds"]
    if num_classes is not None and not (_is_int(num_classes) and num_classes >= 2):
        raise UsageError(f"{source}: num_class_embeds={num_classes!r}: must be an int >= 2")
    if not (_is_int(c["in_channels"]) and c["in_channels"] >= 1):
        raise UsageError(f"{source}: in_channels={c['in_channels']!r}: must be a positive int")
    kwargs = dict(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=c["layers_per_block"],
        attn_resolutions=attn_resolutions,
        dropout=c["dropout"],
        out_channels=c["out_channels"],
        num_classes=None if num_classes is None else num_classes - 1,
        num_heads=heads.pop(),
        num_groups=groups,
        resblock_conditioning=conditioning,
    )
    try:
        module = UNet(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{source}: {' '.join(str(e).split())}") from e
    sample_size = None if size is None else hw
    return DiffusersUNetConfig(module, c["in_channels"], sample_size, c["flip_sin_to_cos"])


_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "norm_out": "conv_norm_out",
    "temb_dense0": "time_embedding.linear_1",
    "temb_dense1": "time_embedding.linear_2",
    "label_emb": "class_embedding",
    "mid_block_1": "mid_block.resnets.0",
    "mid_block_2": "mid_block.resnets.1",
    "mid_attn": "mid_block.attentions.0",
}
_INNER = {
    "temb_proj": "time_emb_proj",
    "shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_LEVEL = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?$")
_PARTS = {
    "block": "resnets",
    "attn": "attentions",
    "downsample": "downsamplers",
    "upsample": "upsamplers",
}


def unet_torch_name(path: tuple[str, ...], levels: int) -> str:
    """Flax parameter path of our :class:`UNet` → diffusers ``UNet2DModel`` state-dict key.

    ``down_blocks.i.resnets.j`` ↔ ``down_{i}_block_{j}``, ``down_blocks.i.attentions.j`` ↔
    ``down_{i}_attn_{j}``, ``up_blocks.k.*`` ↔ ``up_{L-1-k}_*``, ``mid_block.resnets.0/1`` ↔
    ``mid_block_1/2``, inside blocks ``to_q`` ↔ ``q``, ``group_norm`` ↔ ``norm`` etc.; leaves other
    than ``bias`` (kernel, GroupNorm scale, embedding) are ``weight``. E.g.
    ``('up_0_attn_1', 'q', 'kernel')`` with 4 levels → ``'up_blocks.3.attentions.1.to_q.weight'``.

    Args:
        path: the parameter's path in ``variables["params"]``.
        levels: ``len(ch_mult)`` (up blocks are numbered from the bottom in diffusers).
    """
    top, *inner, leaf = path
    if top in _TOP:
        name = _TOP[top]
    else:
        m = _LEVEL.match(top)
        if m is None:
            raise ValueError(f"no diffusers name for the UNet parameter {'/'.join(path)}")
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        name = f"{m[1]}_blocks.{level}.{_PARTS[m[3]]}.{m[4] or 0}"
    inner = [_INNER.get(p, p) for p in inner]
    return ".".join([name, *inner, "bias" if leaf == "bias" else "weight"])


def convert_unet_weights(
    module: UNet,
    state_dict: Mapping[str, np.ndarray],
    *,
    in_channels: int = 3,
    height: int | None = None,
    flip_sin_to_cos: bool = False,
    source: str = "weights",
) -> dict:
    """Converts a diffusers ``UNet2DModel`` state dict (name → NumPy array) to Flax variables.

    Args:
        module: the :class:`UNet` the weights are for (e.g. from
            :func:`unet_from_diffusers_config`).
        state_dict: diffusers parameter names (current or old attention names) → arrays in torch
            layout (float16, bfloat16 or float32).
        in_channels: channels of the model's input (``config.json``'s ``in_channels``).
        height: the input height H the attention resolutions refer to (``config.json``'s
            ``sample_size``); needed when ``module.attn_resolutions`` is not empty.
        flip_sin_to_cos: the checkpoint's time embedding is ``[cos, sin]`` (ours: ``[sin, cos]``).
        source: names the weights in error messages (the file).

    Returns:
        ``{"params": ...}`` for ``module.apply``, float32.

    Raises:
        UsageError: naming the first missing or unexpected keys, or a key whose shape differs.
    """
    if module.attn_resolutions and height is None:
        raise ValueError("convert_unet_weights: height is needed to place the attention blocks")
    width = 2 ** (len(module.ch_mult) - 1)  # the other shapes do not depend on H, W
    x = jax.ShapeDtypeStruct((1, height or width, width, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if module.num_classes is None else t
    shapes = jax.eval_shape(lambda x, t, y: module.init(jax.random.key(0), x, t, y), x, t, y)
    levels = len(module.ch_mult)
    params = convert_state_dict(
        shapes["params"],
        state_dict,
        source=source,
        name_fn=lambda path: unet_torch_name(path, levels),
    )
    if flip_sin_to_cos:  # input rows [cos | sin | pad] -> [sin | cos | pad]
        kernel = params["temb_dense0"]["kernel"]
        half = module.ch // 2
        order = np.r_[half : 2 * half, 0:half, 2 * half : kernel.shape[0]]
        params["temb_dense0"]["kernel"] = kernel[order]
    return {"params": params}


def read_unet_folder(directory: str | Path) -> tuple[DiffusersUNetConfig, dict]:
    """:func:`load_diffusers_unet` with the whole :class:`DiffusersUNetConfig` (sample size...).

    Args:
        directory: as for :func:`load_diffusers_unet`.

    Returns:
        ``(config, variables)``.

    Raises:
        UsageError: as :func:`load_diffusers_unet`.
    """
    config_path, weights_path = find_model_files(directory, "unet")
    spec = unet_from_diffusers_config(read_config(config_path), source=str(config_path))
    variables = convert_unet_weights(
        spec.module,
        read_state_dict(weights_path),
        in_channels=spec.in_channels,
        height=None if spec.sample_size is None else spec.sample_size[0],
        flip_sin_to_cos=spec.flip_sin_to_cos,
        source=str(weights_path),
    )
    return spec, variables


def load_diffusers_unet(directory: str | Path) -> tuple[UNet, dict]:
    """Loads a diffusers ``UNet2DModel`` (e.g. ``google/ddpm-cifar10-32``) into our UNet.

    Args:
        directory: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
            ``.bin``), as written by ``UNet2DModel.save_pretrained``, or a pipeline folder with
            such a ``unet/`` subfolder.

    Returns:
        ``(module, variables)``: ``module.apply(variables, x, t)`` maps ``x`` [B, H, W, C] NHWC
        and ``t`` int32 [B] to the prediction [B, H, W, out_channels] (diffusers' output
        transposed to NHWC; pass ``y`` [B] labels when ``module.num_classes`` is set).

    Raises:
        UsageError: a missing or damaged file, a config value or block type our UNet does not
            implement, missing / unexpected / misshaped weights (one line naming the file and the
            key).
    """
    spec, variables = read_unet_folder(directory)
    return spec.module, variables
