"""Checkpoints in the diffusers layout: the shared file reading and key conversion, and the VAE.

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or,
saved with ``safe_serialization=False``, ``diffusion_pytorch_model.bin``: a ``torch.save``d state
dict, read with the safe reader of :mod:`ddpm_jax.weights.pth`); a pipeline folder holds one such
folder per model (``vae/``, ``unet/``, ...). The first part of this module does not depend on the
model: finding the files (:func:`find_model_files`), reading them (:func:`read_config`,
:func:`read_state_dict`) and converting a torch state dict to the parameters of a Flax module whose
module names follow diffusers' (:func:`convert_state_dict`; other names through its ``name_fn``,
as :mod:`ddpm_jax.weights.diffusers_unet` does). Weights are read with ``safetensors.numpy`` (no
torch needed) and cast to float32.

The second part is the VAE. ``config.json`` maps onto
:class:`ddpm_jax.models.autoencoder.AutoencoderKL` (same keys, :func:`vae_config_from_diffusers`);
parameter names map one to one (``encoder.down_blocks.0.resnets.1.conv1.weight`` ↔ Flax path
``encoder/down_blocks_0_resnets_1/conv1/kernel``), with torch layouts converted: convolutions
OIHW → HWIO, linear (out, in) → dense (in, out), 1x1-convolution attention projections squeezed,
and deprecated attention names (``query``, ``key``, ``value``, ``proj_attn``) accepted for
``to_q``, ``to_k``, ``to_v``, ``to_out.0``.

A missing or damaged file, an unsupported config value and missing / unexpected / misshaped
weights raise :class:`ddpm_jax.errors.UsageError` with one line naming the file.

Example:
    >>> vae, variables = load_diffusers_vae("stable-diffusion-v1-5")  # uses its vae/ folder
    >>> mean, logvar = vae.apply(variables, x, method=AutoencoderKL.encode)  # x: [B, H, W, 3]
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax.errors import UsageError
from ddpm_jax.models.autoencoder import AutoencoderKL, validate_config
from ddpm_jax.weights import pth

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_WEIGHTS_NAME = "diffusion_pytorch_model.bin"  # torch.save format, read if no .safetensors
# Deprecated attention parameter names (diffusers < 0.15 checkpoints) → current names.
_OLD_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

# ------------------------------------------------------------------ files and key conversion


def find_model_files(directory: str | Path, subfolder: str) -> tuple[Path, Path]:
    """The config and weights files of a diffusers model folder.

    Args:
        directory: a model folder (as written by ``save_pretrained``), or a pipeline folder whose
            ``subfolder`` is one.
        subfolder: the model's folder in a pipeline (``"vae"``, ``"unet"``).

    Returns:
        (``config.json``, weights): ``diffusion_pytorch_model.safetensors``, or ``.bin`` when
        only that exists.

    Raises:
        UsageError: a file is missing (the message names it).
    """
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() and (directory / subfolder / CONFIG_NAME).is_file():
        directory = directory / subfolder
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(
            f"{config_path} not found; pass a diffusers model folder ({CONFIG_NAME} and "
            f"{WEIGHTS_NAME}) or a pipeline folder with a {subfolder}/ subfolder"
        )
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if (directory / name).is_file():
            return config_path, directory / name
    raise UsageError(
        f"{directory / WEIGHTS_NAME} not found (nor {BIN_WEIGHTS_NAME}); download the model's "
        "weights into that folder"
    )


def read_config(path: Path) -> dict:
    """Reads a ``config.json``; a damaged one raises UsageError naming it."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        reason = " ".join(str(e).split())
        raise UsageError(f"{path} is damaged ({reason}): download it again") from e
    if not isinstance(config, dict):
        raise UsageError(
            f"{path} is damaged (a JSON {type(config).__name__}, not an object): download it again"
        )
    return config


def read_state_dict(path: Path) -> Mapping[str, np.ndarray]:
    """Reads a ``.safetensors`` file or a ``torch.save``d ``.bin`` state dict, without torch.

    Args:
        path: the weights file.

    Returns:
        Parameter name → NumPy array in torch layout and the file's dtype.

    Raises:
        UsageError: the file is damaged or unreadable (the message names it).
    """
    path = Path(path)
    if path.suffix == ".bin":
        return pth.load_state_dict(path)
    from safetensors import SafetensorError  # Imported here: needed only for these files.
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        reason = " ".join(str(e).split())
        raise UsageError(f"{path} is damaged ({reason}): download it again") from e


def torch_name(path: tuple[str, ...]) -> str:
    """Flax parameter path → diffusers state-dict key.

    Our module names write diffusers' ``a.0.b.1`` as ``a_0_b_1``, e.g.
    ``('encoder', 'down_blocks_0_resnets_1', 'conv1', 'kernel')`` →
    ``'encoder.down_blocks.0.resnets.1.conv1.weight'``; leaves other than ``bias`` are
    ``weight``.
    """
    *modules, leaf = path
    name = ".".join(re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in modules)
    name = re.sub(r"\.(\d+)_", r".\1.", name)
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def _canonical_torch_name(key: str) -> str:
    """A state-dict key with deprecated attention names replaced by the current ones."""
    parts = key.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def _to_flax_layout(
    key: str, array: np.ndarray, leaf: str, target_shape: tuple[int, ...], source: str
) -> np.ndarray:
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
        raise UsageError(
            f"{source}: {key!r} has shape {array.shape} after conversion, expected {target_shape}"
        )
    return array


def convert_state_dict(
    param_shapes: Mapping,
    state_dict: Mapping[str, np.ndarray],
    *,
    source: str = "weights",
    name_fn: Callable[[tuple[str, ...]], str] = torch_name,
) -> dict:
    """Converts a diffusers state dict to the ``params`` of a Flax module.

    Args:
        param_shapes: the module's ``params`` tree of arrays or ``jax.ShapeDtypeStruct`` (e.g.
            ``jax.eval_shape(module.init, ...)["params"]``); paths map to keys by ``name_fn``.
        state_dict: diffusers parameter names (old or new attention names) → arrays in torch
            layout (float16 or float32).
        source: names the weights in error messages (the file).
        name_fn: Flax parameter path → diffusers key (current attention names); the default,
            :func:`torch_name`, is for modules whose names follow diffusers' (the VAE).

    Returns:
        The ``params`` tree, float32 arrays of the shapes of ``param_shapes``.

    Raises:
        UsageError: naming the first missing or unexpected keys, or a key whose shape differs.
    """
    flat_shapes = traverse_util.flatten_dict(param_shapes)
    expected = {name_fn(path): path for path in flat_shapes}
    given = {}
    for key, value in state_dict.items():
        name = _canonical_torch_name(key)
        if name in given:
            raise UsageError(f"{source}: {key!r} duplicates another key after renaming to {name!r}")
        given[name] = (key, value)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(given[k][0] for k in set(given) - set(expected))
    if missing:
        raise UsageError(f"{source}: missing {len(missing)} key(s), e.g. {missing[:5]}")
    if unexpected:
        raise UsageError(f"{source}: unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
    flat = {}
    for name, path in expected.items():
        key, value = given[name]
        array = _to_flax_layout(key, value, path[-1], flat_shapes[path].shape, source)
        flat[path] = jnp.asarray(array)
    return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------ the VAE (AutoencoderKL)

_VAE_MODULE_KEYS = (
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
_VAE_INERT_KEYS = ("sample_size", "force_upcast")
_VAE_LIST_KEYS = ("block_out_channels", "down_block_types", "up_block_types")


def vae_config_from_diffusers(config: dict, *, source: str = CONFIG_NAME) -> dict:
    """Maps a diffusers ``AutoencoderKL`` ``config.json`` dict onto :class:`AutoencoderKL` kwargs.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and inert keys
    (``sample_size``, ``force_upcast``) are ignored; ``latents_mean`` / ``latents_std`` (a
    per-channel normalisation some pipelines use instead of ``scaling_factor``) are ignored with a
    warning when set.

    Args:
        config: the parsed ``config.json``.
        source: names the config in messages (the file).

    Returns:
        Keyword arguments of :class:`AutoencoderKL` (``block_out_channels`` a tuple,
        ``shift_factor`` 0.0 when unset).

    Raises:
        UsageError: an unknown key, or an architecture :class:`AutoencoderKL` does not
            implement (the message names the key).
    """
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in _VAE_INERT_KEYS:
            continue
        if key in _VAE_LIST_KEYS and not isinstance(value, list | tuple):
            raise UsageError(f"{source}: {key}={value!r}: must be a list")
        if key in ("latents_mean", "latents_std"):
            if value is not None:
                warnings.warn(
                    f"{source}: {key} is set but not applied; use scaling_factor", stacklevel=2
                )
            continue
        if key == "act_fn":
            if value not in ("silu", "swish"):
                raise UsageError(f"{source}: act_fn={value!r}: only 'silu' is supported")
            continue
        if key in ("down_block_types", "up_block_types"):
            allowed = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            if any(t != allowed for t in value):
                raise UsageError(f"{source}: {key}={value!r}: only {allowed!r} is supported")
            continue
        if key not in _VAE_MODULE_KEYS:
            raise UsageError(f"{source}: unknown key {key!r} (supported: {_VAE_MODULE_KEYS})")
        kwargs[key] = value
    if kwargs.get("shift_factor") is None:
        kwargs["shift_factor"] = 0.0
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        n = len(kwargs["block_out_channels"])
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != n:
                raise UsageError(
                    f"{source}: {key} has {len(config[key])} entries, block_out_channels {n}"
                )
    return kwargs


def convert_vae_state_dict(
    module: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *, source: str = "weights"
) -> dict:
    """Converts a diffusers ``AutoencoderKL`` state dict (name → NumPy array) to Flax variables.

    Args:
        module: the :class:`AutoencoderKL` the weights are for.
        state_dict: diffusers parameter names (old or new attention names) → arrays in torch
            layout (float16 or float32).
        source: names the weights in error messages (the file).

    Returns:
        ``{"params": ...}`` for ``module.apply``, float32.

    Raises:
        UsageError: naming the first missing or unexpected keys, or a key whose shape differs.
    """
    f = module.downsampling_factor
    dummy = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, sample_posterior=False))
    return {"params": convert_state_dict(shapes["params"], state_dict, source=source)}


def load_diffusers_vae(directory: str | Path) -> tuple[AutoencoderKL, dict]:
    """Loads the VAE of a Stable-Diffusion-style checkpoint in the diffusers layout.

    Args:
        directory: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
            ``.bin``), as written by ``AutoencoderKL.save_pretrained``, or a pipeline folder with
            such a ``vae/`` subfolder.

    Returns:
        (module, variables): ``module.apply(variables, x, method=AutoencoderKL.encode)`` gives
        ``(mean, logvar)`` [B, H/f, W/f, latent_channels] for ``x`` [B, H, W, C] in [-1, 1];
        ``method=AutoencoderKL.decode`` maps an unscaled latent back to an image.
        ``module.scaling_factor`` / ``shift_factor`` come from the config.

    Raises:
        UsageError: a missing or damaged file, unsupported config values, missing / unexpected /
            misshaped weights (one line naming the file and the key).
    """
    config_path, weights_path = find_model_files(directory, "vae")
    kwargs = vae_config_from_diffusers(read_config(config_path), source=str(config_path))
    module = AutoencoderKL(**kwargs)
    try:
        validate_config(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            block_out_channels=module.block_out_channels,
            layers_per_block=module.layers_per_block,
            latent_channels=module.latent_channels,
            norm_num_groups=module.norm_num_groups,
        )
    except ValueError as e:
        raise UsageError(f"{config_path}: {e}") from e
    state_dict = read_state_dict(weights_path)
    return module, convert_vae_state_dict(module, state_dict, source=str(weights_path))
