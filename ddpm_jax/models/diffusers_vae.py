"""Load the VAE of a Stable-Diffusion-style checkpoint (diffusers layout) into our Flax module.

A diffusers ``AutoencoderKL`` folder holds ``config.json`` and
``diffusion_pytorch_model.safetensors``. The config maps onto
:class:`ddpm_jax.models.autoencoder.AutoencoderKL` (same keys); parameter names map one to one
(``encoder.down_blocks.0.resnets.1.conv1.weight`` ↔ Flax path
``encoder/down_blocks_0_resnets_1/conv1/kernel``), with torch layouts converted: convolutions
OIHW → HWIO, linear (out, in) → dense (in, out), 1x1-convolution attention projections squeezed,
and deprecated attention names (``query``, ``key``, ``value``, ``proj_attn``) accepted for
``to_q``, ``to_k``, ``to_v``, ``to_out.0``. Weights are read with ``safetensors.numpy`` (no torch
needed) and cast to float32.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.models.autoencoder import AutoencoderKL

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_MODULE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
# Keys of diffusers' config that do not change the network's function.
_INERT_KEYS = ("sample_size", "force_upcast")
# Deprecated attention parameter names (diffusers < 0.15 checkpoints) → current names.
_OLD_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def config_from_diffusers(config: dict) -> dict:
    """Map a diffusers ``AutoencoderKL`` ``config.json`` dict onto :class:`AutoencoderKL` kwargs.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and inert keys
    (``sample_size``, ``force_upcast``) are ignored; ``latents_mean`` / ``latents_std`` (a
    per-channel normalisation some pipelines use instead of ``scaling_factor``) are ignored with a
    warning when set. Any other unknown key, or an architecture this module does not implement,
    raises ValueError naming the key.
    """
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in _INERT_KEYS:
            continue
        if key in ("latents_mean", "latents_std"):
            if value is not None:
                warnings.warn(
                    f"config.json: {key} is set but not applied; use scaling_factor",
                    stacklevel=2,
                )
            continue
        if key == "act_fn":
            if value not in ("silu", "swish"):
                raise ValueError(f"config.json: act_fn={value!r}: only 'silu' is supported")
            continue
        if key in ("down_block_types", "up_block_types"):
            allowed = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            if any(t != allowed for t in value):
                raise ValueError(f"config.json: {key}={value!r}: only {allowed!r} is supported")
            continue
        if key not in _MODULE_KEYS:
            raise ValueError(f"config.json: unknown key {key!r} (supported: {_MODULE_KEYS})")
        kwargs[key] = value
    if kwargs.get("shift_factor") is None:
        kwargs["shift_factor"] = 0.0
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        n = len(kwargs["block_out_channels"])
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != n:
                raise ValueError(
                    f"config.json: {key} has {len(config[key])} entries, block_out_channels {n}"
                )
    return kwargs


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax parameter path → diffusers state-dict key, e.g.
    ('encoder', 'down_blocks_0_resnets_1', 'conv1', 'kernel') →
    'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = path
    name = ".".join(re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in modules)
    name = re.sub(r"\.(\d+)_", r".\1.", name)
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _canonical_torch_name(key: str) -> str:
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def _convert(key: str, array: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout → Flax layout (OIHW → HWIO convolutions, (out, in) → (in, out) dense)."""
    array = np.asarray(array, dtype=np.float32)
    if leaf == "kernel" and len(target_shape) == 4 and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(target_shape) == 2:
        if array.ndim == 4 and array.shape[2:] == (1, 1):  # 1x1-conv attention projections
            array = array[:, :, 0, 0]
        if array.ndim == 2:
            array = array.T
    if array.shape != tuple(target_shape):
        raise ValueError(
            f"weights: {key!r} has shape {array.shape} after conversion, expected {target_shape}"
        )
    return array


def convert_diffusers_state_dict(module: AutoencoderKL, state_dict: dict) -> dict:
    """Convert a diffusers ``AutoencoderKL`` state dict (name → NumPy array) to Flax variables.

    Args:
        module: the :class:`AutoencoderKL` the weights are for.
        state_dict: diffusers parameter names (old or new attention names) → arrays in torch
            layout (float16 or float32).

    Returns:
        ``{"params": ...}`` for ``module.apply``, float32.

    Raises:
        ValueError: naming the first missing or unexpected keys, or a key whose shape differs.
    """
    f = module.downsampling_factor
    dummy = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, sample_posterior=False))
    flat_shapes = traverse_util.flatten_dict(shapes["params"])
    expected = {_torch_name(path): path for path in flat_shapes}
    given = {}
    for key, value in state_dict.items():
        name = _canonical_torch_name(key)
        if name in given:
            raise ValueError(f"weights: {key!r} duplicates another key after renaming to {name!r}")
        given[name] = (key, value)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(given[k][0] for k in set(given) - set(expected))
    if missing:
        raise ValueError(f"weights: missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"weights: unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
    flat = {}
    for name, path in expected.items():
        key, value = given[name]
        flat[path] = jnp.asarray(_convert(key, value, path[-1], flat_shapes[path].shape))
    return {"params": traverse_util.unflatten_dict(flat)}


def load(directory: str | Path) -> tuple[AutoencoderKL, dict]:
    """Load the VAE of a Stable-Diffusion-style checkpoint in the diffusers layout.

    Args:
        directory: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
            (as written by ``AutoencoderKL.save_pretrained``), or a pipeline folder with such a
            ``vae/`` subfolder.

    Returns:
        (module, variables): ``module.apply(variables, x, method=AutoencoderKL.encode)`` gives
        ``(mean, logvar)`` for NHWC ``x`` in [-1, 1]; ``method=AutoencoderKL.decode`` maps an
        unscaled latent back to an image. ``module.scaling_factor`` / ``shift_factor`` come
        from the config.

    Raises:
        ValueError: missing files, unsupported config values, missing / unexpected / misshaped
            weights (the message names the file or key).
    """
    from safetensors.numpy import load_file  # Optional dependency, needed only here.

    directory = Path(directory)
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"
    config_path, weights_path = directory / "config.json", directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"directory={str(directory)!r}: {path.name} not found")
    module = AutoencoderKL(**config_from_diffusers(json.loads(config_path.read_text())))
    return module, convert_diffusers_state_dict(module, load_file(str(weights_path)))
