"""Tests of ddpm_jax.weights.diffusers: the VAE of a diffusers checkpoint in our AutoencoderKL.

Our random parameters are written in the diffusers layout (names, OIHW, (out, in)) and read back;
with torch and diffusers installed, encode / decode are compared with diffusers' AutoencoderKL.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params
from flax import traverse_util

from ddpm_jax.errors import UsageError
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.weights.diffusers import load_diffusers_vae

DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.42.1",
    "act_fn": "silu",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 1,
    "mid_block_add_attention": True,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.5,
    "shift_factor": None,
    "use_post_quant_conv": True,
    "use_quant_conv": True,
}


def _to_torch_layout(params):
    """Our random parameters written as a diffusers state dict (names, OIHW, (out, in))."""
    state = {}
    for path, value in traverse_util.flatten_dict(params["params"]).items():
        name = ".".join(path[:-1])
        for old, new in [
            ("down_blocks_", "down_blocks."),
            ("up_blocks_", "up_blocks."),
            ("_resnets_", ".resnets."),
            ("_upsamplers_", ".upsamplers."),
            ("_downsamplers_", ".downsamplers."),
            ("resnets_", "resnets."),
            ("attentions_", "attentions."),
            ("to_out_0", "to_out.0"),
        ]:
            name = name.replace(old, new)
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[f"{name}.{'bias' if path[-1] == 'bias' else 'weight'}"] = np.ascontiguousarray(value)
    return state


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    pytest.importorskip("safetensors")
    module = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4
    )
    params = random_params(module, jnp.zeros((1, 8, 8, 3)), sample_posterior=False, seed=3)
    return params, _to_torch_layout(params), tmp_path_factory.mktemp("vae")


def _write(directory, state, config=DIFFUSERS_CONFIG):
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_loader_round_trip_with_diffusers_names(saved_vae):
    params, state, tmp = saved_vae
    for name in [
        "encoder.down_blocks.0.resnets.0.conv1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.conv_in.bias",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.to_out.0.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.resnets.1.norm2.bias",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert name in state, name
    module, loaded = load_diffusers_vae(_write(tmp / "new", state))
    assert module.block_out_channels == (8, 16) and module.scaling_factor == 0.5
    assert module.shift_factor == 0.0
    _assert_same_params(loaded, params)
    # A pipeline folder with a vae/ subfolder works too.
    _write(tmp / "pipe" / "vae", state)
    _assert_same_params(load_diffusers_vae(tmp / "pipe")[1], params)


def test_loader_accepts_old_attention_names_and_1x1_conv_weights(saved_vae):
    params, state, tmp = saved_vae
    old = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for name, value in state.items():
        for new, legacy in renames.items():
            if f"attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{legacy}.")
                if value.ndim == 2:
                    value = value[:, :, None, None]  # conv-style 1x1 projection
        old[name] = value.astype(np.float16).astype(np.float32)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in old
    _, loaded = load_diffusers_vae(_write(tmp / "old", old))
    expected = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), params)
    _assert_same_params(loaded, expected)


def test_loader_errors_name_the_key(saved_vae):
    _, state, tmp = saved_vae
    missing = {k: v for k, v in state.items() if k != "encoder.conv_in.weight"}
    with pytest.raises(UsageError, match=r"missing.*encoder\.conv_in\.weight"):
        load_diffusers_vae(_write(tmp / "missing", missing))
    extra = {**state, "encoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(UsageError, match=r"unexpected.*encoder\.extra\.weight"):
        load_diffusers_vae(_write(tmp / "extra", extra))
    bad = {**state, "decoder.conv_out.weight": np.zeros((3, 8, 1, 1), np.float32)}
    with pytest.raises(UsageError, match=r"decoder\.conv_out\.weight.*shape"):
        load_diffusers_vae(_write(tmp / "shape", bad))
    with pytest.raises(UsageError, match="unknown key 'foo'"):
        load_diffusers_vae(_write(tmp / "cfg1", state, {**DIFFUSERS_CONFIG, "foo": 1}))
    blocks = {**DIFFUSERS_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 2}
    with pytest.raises(UsageError, match="down_block_types"):
        load_diffusers_vae(_write(tmp / "cfg2", state, blocks))
    with pytest.raises(UsageError, match="config.json not found"):
        load_diffusers_vae(tmp / "nowhere")


def test_encode_decode_match_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # Random weights everywhere, GroupNorm affines included.
        for name, p in ref.named_parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 4
            p.copy_(torch.randn_like(p) / np.sqrt(fan_in) + float(name.endswith("norm1.weight")))
    ref.save_pretrained(tmp_path)
    module, params = load_diffusers_vae(tmp_path)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
        ref_image = ref.decode(torch.from_numpy(z)).sample.numpy()
    nhwc, nchw = (0, 2, 3, 1), (0, 3, 1, 2)
    mean, logvar = module.apply(params, x.transpose(nhwc), method=AutoencoderKL.encode)
    image = module.apply(params, z.transpose(nhwc), method=AutoencoderKL.decode)

    def rel(a, b):
        return np.linalg.norm(np.asarray(a).transpose(nchw) - b) / np.linalg.norm(b)

    assert rel(mean, ref_mean) <= 1e-4
    assert rel(logvar, ref_logvar) <= 1e-4
    assert rel(image, ref_image) <= 1e-4
    assert np.std(ref_logvar) > 0.1 and np.std(ref_image) > 0.1  # not a trivial comparison


# --- a damaged or missing file is a usage error naming it -----------------------------------


def _assert_usage_error(path, match, fn, *args):
    """``fn(*args)`` raises UsageError: one line that names ``path`` and matches ``match``."""
    with pytest.raises(UsageError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


def test_truncated_safetensors_is_a_usage_error_naming_the_file(saved_vae):
    _, state, tmp = saved_vae
    folder = _write(tmp / "truncated", state)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) - 100, 40, 3, 0):
        weights.write_bytes(data[:size])
        _assert_usage_error(weights, "is damaged .*download it again", load_diffusers_vae, folder)


def test_garbage_config_is_a_usage_error_naming_the_file(saved_vae):
    _, state, tmp = saved_vae
    folder = _write(tmp / "garbage", state)
    config = folder / "config.json"
    for garbage in (b'{"in_channels": 3,', b"\xff\xfe not json", b"[1, 2]"):
        config.write_bytes(garbage)
        _assert_usage_error(config, "is damaged", load_diffusers_vae, folder)


def test_unusable_config_values_are_usage_errors_naming_the_file(saved_vae):
    _, state, tmp = saved_vae
    for name, change, match in [
        ("groups", {"norm_num_groups": 3}, "norm_num_groups=3"),
        ("act", {"act_fn": "gelu"}, "act_fn='gelu'"),
        ("type", {"block_out_channels": 8}, "block_out_channels=8: must be a list"),
    ]:
        folder = _write(tmp / f"value_{name}", state, {**DIFFUSERS_CONFIG, **change})
        _assert_usage_error(folder / "config.json", match, load_diffusers_vae, folder)


def test_missing_files_are_usage_errors_naming_them(saved_vae):
    _, state, tmp = saved_vae
    nowhere = tmp / "nowhere"
    _assert_usage_error(nowhere / "config.json", "not found", load_diffusers_vae, nowhere)
    folder = _write(tmp / "no_weights", state)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    _assert_usage_error(weights, "not found", load_diffusers_vae, folder)
    # Key errors name the weights file.
    missing = {k: v for k, v in state.items() if k != "encoder.conv_in.weight"}
    folder = _write(tmp / "key_missing", missing)
    weights = folder / "diffusion_pytorch_model.safetensors"
    _assert_usage_error(weights, "missing 1 key", load_diffusers_vae, folder)


def test_bin_weights_load_like_safetensors_and_a_truncated_one_is_named(saved_vae):
    torch = pytest.importorskip("torch")
    params, state, tmp = saved_vae
    folder = tmp / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    weights = folder / "diffusion_pytorch_model.bin"
    torch.save({k: torch.tensor(v) for k, v in state.items()}, weights)
    _assert_same_params(load_diffusers_vae(folder)[1], params)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_usage_error(weights, "is damaged .*download it again", load_diffusers_vae, folder)
