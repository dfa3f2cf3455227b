"""Tests of ddpm_jax.weights.diffusers_unet: diffusers ``UNet2DModel`` folders in our UNet.

Known answers from the reference implementation (skipped without torch / diffusers): random
diffusers models in the configurations of the published DDPM checkpoints, written with
``save_pretrained`` (safetensors and ``.bin``), give the same outputs once loaded. "Same" is
measured as ``||ours - diffusers||_2 / ||diffusers||_2`` over the whole output batch (NHWC vs
NCHW transposed), required ≤ 1e-4 (float32 on CPU; measured 1e-6 to 4e-6).

Config errors are checked without torch: the config is refused before the weights are read.
"""

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.errors import UsageError
from ddpm_jax.weights import load_diffusers_unet
from ddpm_jax.weights.diffusers_unet import UNET_DEFAULTS, unet_torch_name

# google/ddpm-cifar10-32's config.json as published (the keys diffusers 0.0.4 wrote; the others
# take diffusers' defaults).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# google/ddpm-church-256 (also bedroom, cat): six levels, attention at 16x16 only. Its widths are
# (128, 128, 256, 256, 512, 512), 113M parameters: too slow for two CPU cores, so the test keeps
# the structure with a quarter of the widths.
CHURCH_CONFIG = {
    **CIFAR10_CONFIG,
    "block_out_channels": [32, 32, 64, 64, 128, 128],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 256,
}
# A small model for the options the DDPM checkpoints do not use.
TINY_CONFIG = {
    **CIFAR10_CONFIG,
    "block_out_channels": [16, 32],
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 8,
}


def _diffusers_model(config, seed):
    """diffusers' UNet2DModel for ``config`` with every parameter (norms too) randomised."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def _save(ref, directory, safe, config=None):
    ref.save_pretrained(directory, safe_serialization=safe)
    if config is not None:  # the published config.json instead of the complete one
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def _outputs(ref, module, variables, batch, seed=0, y=None):
    """(ours, diffusers') on the same random x [B, H, W, C] and t [B]; NHWC float32."""
    import torch

    size = ref.config.sample_size
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, ref.config.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    out = np.asarray(jax.jit(module.apply)(variables, x, t, y))
    with torch.no_grad():
        labels = None if y is None else torch.from_numpy(np.array(y)).long()
        ref_out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), labels)
    return out, ref_out.sample.numpy().transpose(0, 2, 3, 1)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.slow
@pytest.mark.parametrize("config, batch", [(CIFAR10_CONFIG, 2), (CHURCH_CONFIG, 1)])
def test_ddpm_checkpoint_configs_match_diffusers(tmp_path, config, batch):
    ref = _diffusers_model(config, seed=0)
    safe = _save(ref, tmp_path / "safetensors", True, config)
    binary = _save(ref, tmp_path / "bin", False)  # the complete config diffusers writes
    assert (binary / "diffusion_pytorch_model.bin").is_file()
    module, variables = load_diffusers_unet(safe)
    assert module.ch_mult == tuple(w // module.ch for w in config["block_out_channels"])
    assert module.attn_resolutions == (16,) and module.num_heads == 1
    assert module.num_res_blocks == 2 and module.num_groups == 32
    n_params = sum(p.size for p in jax.tree.leaves(variables))
    assert n_params == sum(p.numel() for p in ref.parameters())
    if config is CIFAR10_CONFIG:
        assert n_params == 35_746_307  # Ho et al.'s CIFAR-10 model
    # The .bin (safe .pth reader) gives the very same parameters, so the same outputs.
    _assert_same_params(load_diffusers_unet(binary)[1], variables)

    out, ref_out = _outputs(ref, module, variables, batch)
    assert np.abs(ref_out).max() > 0.5  # not a trivial comparison
    assert _rel(out, ref_out) <= 1e-4, _rel(out, ref_out)  # measured 3e-6 / 4e-6


@pytest.mark.parametrize(
    "change",
    [
        # [cos, sin] time embedding, a label table, two heads (attention at 32 channels only).
        dict(
            flip_sin_to_cos=True,
            num_class_embeds=4,
            attention_head_dim=16,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        ),
        # FiLM residual blocks; attn_norm_num_groups keeps the middle attention's GroupNorm.
        dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, dropout=0.1),
    ],
)
def test_other_supported_options_match_diffusers(tmp_path, change):
    ref = _diffusers_model({**TINY_CONFIG, **change}, seed=1)
    module, variables = load_diffusers_unet(_save(ref, tmp_path, True))
    y = None
    if "num_class_embeds" in change:
        assert module.num_classes == 3 and module.num_heads == 2 and module.attn_resolutions == (4,)
        y = jnp.array([0, 3])  # every row of diffusers' table is a label of ours
    else:
        assert module.resblock_conditioning == "scale_shift" and module.dropout == 0.1
    out, ref_out = _outputs(ref, module, variables, 2, y=y)
    assert np.abs(ref_out).max() > 0.5
    assert _rel(out, ref_out) <= 1e-4, _rel(out, ref_out)  # measured 9e-7


def test_old_attention_names_in_a_legacy_bin(tmp_path):
    """The original google/ddpm-* .bin files name attention query/key/value/proj_attn."""
    torch = pytest.importorskip("torch")
    ref = _diffusers_model(TINY_CONFIG, seed=2)
    _, variables = load_diffusers_unet(_save(ref, tmp_path / "new", True))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, value in ref.state_dict().items():
        for new, legacy in renames.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        old[name] = value.half()  # and float16, as some published files are
    assert "mid_block.attentions.0.proj_attn.weight" in old
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    torch.save(old, folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    _, loaded = load_diffusers_unet(folder)
    expected = jax.tree.map(
        lambda a: np.asarray(a).astype(np.float16).astype(np.float32), variables
    )
    _assert_same_params(loaded, expected)


def test_defaults_are_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert {k: v if not isinstance(v, tuple) else tuple(v) for k, v in defaults.items()} == (
        UNET_DEFAULTS
    )


def test_torch_names():
    assert unet_torch_name(("up_0_attn_1", "q", "kernel"), 4) == (
        "up_blocks.3.attentions.1.to_q.weight"
    )
    assert unet_torch_name(("down_2_downsample", "conv", "bias"), 4) == (
        "down_blocks.2.downsamplers.0.conv.bias"
    )
    assert unet_torch_name(("mid_block_2", "shortcut", "kernel"), 4) == (
        "mid_block.resnets.1.conv_shortcut.weight"
    )
    assert unet_torch_name(("norm_out", "scale"), 4) == "conv_norm_out.weight"
    assert unet_torch_name(("label_emb", "embedding"), 4) == "class_embedding.weight"


# --- refusals: one line naming the file and the key ------------------------------------------


def _folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # refused before reading
    return folder


def _assert_usage_error(path, match, fn, *args):
    with pytest.raises(UsageError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]), "'CrossAttnDownBlock2D'"),
        (dict(up_block_types=["UpBlock2D", "AttnSkipUpBlock2D"]), "'AttnSkipUpBlock2D'"),
        (dict(up_block_types=["AttnUpBlock2D", "UpBlock2D"]), "must mirror down_block_types"),
        (dict(block_out_channels=[16, 24]), "multiple of the first"),
        (dict(freq_shift=0), "freq_shift=0"),
        (dict(norm_eps=1e-5), "norm_eps=1e-05"),
        (dict(downsample_padding=1), "downsample_padding=1"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
        (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups=None"),
        (dict(attention_head_dim=8), "attention_head_dim=8 .* same number of heads"),
        (dict(sample_size=None), "sample_size=None"),
        (dict(norm_num_groups=3), "num_groups=3"),
        (dict(_class_name="UNet2DConditionModel"), "'UNet2DConditionModel'"),
        (dict(cross_attention_dim=8), r"unknown key\(s\) \['cross_attention_dim'\]"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, match):
    folder = _folder(tmp_path, "model", {**TINY_CONFIG, **change})
    _assert_usage_error(folder / "config.json", match, load_diffusers_unet, folder)


def test_a_missing_key_takes_diffusers_default_and_is_refused_if_we_lack_it(tmp_path):
    config = {k: v for k, v in TINY_CONFIG.items() if k != "norm_eps"}  # diffusers: 1e-5
    folder = _folder(tmp_path, "model", config)
    _assert_usage_error(folder / "config.json", "norm_eps=1e-05", load_diffusers_unet, folder)


def test_missing_weights_are_refused(tmp_path):
    ref = _diffusers_model(TINY_CONFIG, seed=3)
    folder = _save(ref, tmp_path / "model", True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file, save_file

    state = load_file(str(weights))
    del state["down_blocks.0.attentions.0.to_k.weight"]
    save_file(state, str(weights))
    match = r"missing 1 key.*down_blocks\.0\.attentions\.0\.to_k\.weight"
    _assert_usage_error(weights, match, load_diffusers_unet, folder)
    weights.unlink()
    _assert_usage_error(weights, "not found", load_diffusers_unet, folder)
    _assert_usage_error(
        tmp_path / "nowhere", "not found", load_diffusers_unet, tmp_path / "nowhere"
    )
