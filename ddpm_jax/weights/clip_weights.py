"""A transformers ``CLIPTextModel`` folder (``text_encoder/`` of an SD pipeline) in our
:class:`~ddpm_jax.models.clip_text.CLIPTextTransformer`, without torch or transformers.

The folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read by the
safe reader; a sharded ``*.index.json`` too). ``config.json`` → module
(:func:`clip_text_from_config`): ``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_hidden_layers`` (SD 2.x's 23 of OpenCLIP's 24 layers is its penultimate layer),
``num_attention_heads``, ``max_position_embeddings``, ``hidden_act`` (``quick_gelu``, ``gelu``,
...), ``layer_norm_eps``; missing keys take transformers' ``CLIPTextConfig`` defaults. Other keys
(token ids, dropout rates, initialisers, ``projection_dim``) do not change
``last_hidden_state`` and are ignored; ``model_type`` must be ``clip_text_model`` and
``architectures`` (when given) ``CLIPTextModel``.

Weights: with or without the ``text_model.`` prefix (transformers ≥ 5.6 saves without it);
``embeddings.position_ids`` (a buffer older versions saved) is ignored. Every other weight must
be used and every parameter assigned (:func:`~ddpm_jax.weights.diffusers.convert_state_dict`).

Example:
    >>> encoder, variables = load_clip_text_encoder("stable-diffusion-v1-5/text_encoder")
    >>> context = encoder.apply(variables, tokens)  # tokens: int32 [B, 77] → [B, 77, 768]
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from ddpm_jax.errors import UsageError
from ddpm_jax.models.clip_text import ACTIVATIONS, CLIPTextTransformer
from ddpm_jax.weights.diffusers import convert_state_dict, read_config, read_state_dict

WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PREFIX = "text_model."
# transformers' CLIPTextConfig defaults: config key -> (CLIPTextTransformer field, default).
CLIP_TEXT_KEYS = {
    "vocab_size": ("vocab_size", 49408),
    "hidden_size": ("hidden_size", 512),
    "intermediate_size": ("intermediate_size", 2048),
    "num_hidden_layers": ("num_layers", 12),
    "num_attention_heads": ("num_heads", 8),
    "max_position_embeddings": ("max_position_embeddings", 77),
    "hidden_act": ("hidden_act", "quick_gelu"),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
}


def clip_text_from_config(config: dict, *, source: str = "config.json") -> CLIPTextTransformer:
    """Maps a transformers ``CLIPTextModel`` ``config.json`` dict onto our module.

    Raises:
        UsageError: one line naming the key of another model type or a value we do not compute.
    """
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise UsageError(f"{source}: model_type={model_type!r}: expected 'clip_text_model'")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise UsageError(
            f"{source}: architectures={architectures!r}: only CLIPTextModel loads (a projection "
            "head or another model is not SD 1.x / 2.x's text encoder)"
        )
    kwargs = {}
    for key, (field, default) in CLIP_TEXT_KEYS.items():
        value = config.get(key, default)
        if key == "hidden_act":
            if value not in ACTIVATIONS:
                raise UsageError(
                    f"{source}: hidden_act={value!r} is not supported ({tuple(ACTIVATIONS)})"
                )
        elif key == "layer_norm_eps":
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{source}: layer_norm_eps={value!r}: must be a positive number")
            value = float(value)
        elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UsageError(f"{source}: {key}={value!r}: must be a positive int")
        kwargs[field] = value
    try:
        return CLIPTextTransformer(**kwargs)
    except ValueError as e:
        raise UsageError(f"{source}: {' '.join(str(e).split())}") from e


def clip_torch_name(path: tuple[str, ...]) -> str:
    """Flax parameter path → transformers key without the ``text_model.`` prefix.

    E.g. ``('layers_3', 'self_attn', 'q_proj', 'kernel')`` →
    ``'encoder.layers.3.self_attn.q_proj.weight'``, ``('token_embedding', 'embedding')`` →
    ``'embeddings.token_embedding.weight'``.
    """
    top, *inner, leaf = path
    if top in ("token_embedding", "position_embedding"):
        top = f"embeddings.{top}"
    elif top.startswith("layers_"):
        top = f"encoder.layers.{top[len('layers_') :]}"
    return ".".join([top, *inner, "bias" if leaf == "bias" else "weight"])


def _read_weights(directory: Path) -> tuple[dict, str]:
    """The folder's state dict (shards merged) and the file that names it in messages."""
    for name in WEIGHTS_NAMES:
        if (directory / name).is_file():
            return dict(read_state_dict(directory / name)), str(directory / name)
    for name in INDEX_NAMES:
        index = directory / name
        if index.is_file():
            weight_map = read_config(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UsageError(f"{index} is damaged (no weight_map object): download it again")
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                if not (directory / shard).is_file():
                    raise UsageError(f"{directory / shard} not found (listed in {index})")
                state_dict.update(read_state_dict(directory / shard))
            return state_dict, str(index)
    raise UsageError(
        f"{directory / WEIGHTS_NAMES[0]} not found (nor {WEIGHTS_NAMES[1]}): download the text "
        "encoder's weights into that folder"
    )


def load_clip_text_encoder(directory: str | Path) -> tuple[CLIPTextTransformer, dict]:
    """Loads a transformers ``CLIPTextModel`` folder.

    Args:
        directory: a folder with ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``) as ``CLIPTextModel.save_pretrained`` writes it, or a pipeline
            folder with such a ``text_encoder/`` subfolder.

    Returns:
        ``(module, variables)``: ``module.apply(variables, tokens)`` maps int32 [B, L] ids to
        transformers' ``last_hidden_state`` [B, L, hidden_size] float32.

    Raises:
        UsageError: a missing or damaged file, a config value we do not compute, missing /
            unexpected / misshaped weights (one line naming the file and the key).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file() and (directory / "text_encoder").is_dir():
        directory = directory / "text_encoder"
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found: pass a CLIPTextModel folder")
    module = clip_text_from_config(read_config(config_path), source=str(config_path))
    state_dict, source = _read_weights(directory)
    if any(key.startswith(PREFIX) for key in state_dict):
        state_dict = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    state_dict.pop("embeddings.position_ids", None)
    tokens = jnp.zeros((1, module.max_position_embeddings), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))
    params = convert_state_dict(
        shapes["params"], state_dict, source=source, name_fn=clip_torch_name
    )
    return module, {"params": params}


__all__ = ["clip_text_from_config", "clip_torch_name", "load_clip_text_encoder"]
