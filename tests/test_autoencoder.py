"""Tests for ddpm_jax.models.autoencoder and the diffusers VAE loader."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params
from flax import traverse_util

from ddpm_jax.models.autoencoder import (
    AutoencoderKL,
    estimate_scale_factor,
    kl_to_standard_normal,
    load_diffusers_vae,
    sample_latent,
    scale_latents,
    unscale_latents,
)

TINY = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


@pytest.fixture(scope="module")
def tiny():
    module = AutoencoderKL(**TINY)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
    params = random_params(module, x, sample_posterior=False)
    return module, params, x


# ------------------------------------------------------------------------------------ module


def test_latent_shapes(tiny):
    module, params, x = tiny
    assert module.downsampling_factor == 4
    mean, logvar = module.apply(params, x, method=AutoencoderKL.encode)
    assert mean.shape == logvar.shape == (2, 8, 8, 4)
    image = module.apply(params, mean, method=AutoencoderKL.decode)
    assert image.shape == (2, 32, 32, 1) and image.dtype == jnp.float32
    # Non-square inputs work too: 16 x 24 → 4 x 6 latents.
    m2, _ = module.apply(params, x[:, :16, :24], method=AutoencoderKL.encode)
    assert m2.shape == (2, 4, 6, 4)


def test_call_samples_posterior_or_uses_mean(tiny):
    module, params, x = tiny
    key = jax.random.key(5)
    recon, mean, logvar = module.apply(params, x, key)
    expected = module.apply(params, sample_latent(key, mean, logvar), method=AutoencoderKL.decode)
    np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-5)
    recon_mean, _, _ = module.apply(params, x, sample_posterior=False)
    np.testing.assert_allclose(
        recon_mean, module.apply(params, mean, method=AutoencoderKL.decode), rtol=1e-5, atol=1e-5
    )
    assert np.abs(np.asarray(recon - recon_mean)).max() > 1e-4
    with pytest.raises(ValueError, match="key"):
        module.apply(params, x)


def test_logvar_is_clipped_to_ldm_range(tiny):
    module, params, x = tiny
    for bias, bound in [(1e3, 20.0), (-1e3, -30.0)]:
        p = jax.tree.map(lambda a: a, params)
        b = p["params"]["quant_conv"]["bias"]
        p["params"]["quant_conv"]["bias"] = b.at[4:].set(bias)  # second half = log-variance
        mean, logvar = module.apply(p, x, method=AutoencoderKL.encode)
        np.testing.assert_array_equal(logvar, bound)
        assert np.abs(np.asarray(mean)).max() < 1e2


def test_config_validation():
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(**{**TINY, "norm_num_groups": 3}).init(jax.random.key(0), x, None, False)
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderKL(**{**TINY, "block_out_channels": ()}).init(jax.random.key(0), x, None, False)


# ------------------------------------------------------------------------------------ math


def test_sample_latent_has_posterior_moments():
    mean = jnp.full((20000, 2, 2, 1), 1.5)
    logvar = jnp.full_like(mean, np.log(0.25))
    z = np.asarray(sample_latent(jax.random.key(0), mean, logvar), np.float64)
    assert abs(z.mean() - 1.5) < 4 * 0.5 / np.sqrt(z.size)
    assert abs(z.std() - 0.5) < 0.01


def test_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4, 4, 2))
    logvar = rng.normal(size=(3, 4, 4, 2))
    expected = np.array(
        [
            sum(
                0.5 * (m**2 + np.exp(lv) - 1 - lv)
                for m, lv in zip(mean[b].ravel(), logvar[b].ravel(), strict=True)
            )
            for b in range(3)
        ]
    )
    kl = kl_to_standard_normal(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    assert kl.shape == (3,)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    np.testing.assert_allclose(kl_to_standard_normal(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_scale_factor_is_inverse_std_and_scaling_round_trips():
    z = 3.0 * jax.random.normal(jax.random.key(0), (64, 8, 8, 4)) + 0.7
    scale = estimate_scale_factor(z)
    np.testing.assert_allclose(scale, 1.0 / np.std(np.asarray(z, np.float64)), rtol=1e-5)
    assert abs(float(scale) - 1 / 3) < 0.01
    np.testing.assert_allclose(jnp.std(scale_latents(z, scale)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        unscale_latents(scale_latents(z, scale, 0.7), scale, 0.7), z, rtol=1e-5, atol=1e-5
    )
    assert AutoencoderKL().scaling_factor == 0.18215
    with pytest.raises(ValueError, match="latents"):
        estimate_scale_factor(jnp.ones((1,)))


# ------------------------------------------------------------------------------------ loader


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
    with pytest.raises(ValueError, match=r"missing.*encoder\.conv_in\.weight"):
        load_diffusers_vae(_write(tmp / "missing", missing))
    extra = {**state, "encoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra\.weight"):
        load_diffusers_vae(_write(tmp / "extra", extra))
    bad = {**state, "decoder.conv_out.weight": np.zeros((3, 8, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.weight.*shape"):
        load_diffusers_vae(_write(tmp / "shape", bad))
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        load_diffusers_vae(_write(tmp / "cfg1", state, {**DIFFUSERS_CONFIG, "foo": 1}))
    blocks = {**DIFFUSERS_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 2}
    with pytest.raises(ValueError, match="down_block_types"):
        load_diffusers_vae(_write(tmp / "cfg2", state, blocks))
    with pytest.raises(ValueError, match="config.json not found"):
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
