"""Tests of the Stable-Diffusion UNet (ddpm_jax.models.sd_unet) and its diffusers loader.

Known answers from diffusers (skipped without torch / diffusers): random ``UNet2DConditionModel``s
shaped like SD 1.x (1x1-convolution projections, 8 heads everywhere) and SD 2.x (linear
projections, heads per level, ``upcast_attention``), written with ``save_pretrained``, give the
same outputs once loaded: ``||ours - diffusers||_2 / ||diffusers||_2`` ≤ 1e-4 at t = 1, 500, 999
(float32 on CPU; measured 0.9e-6 to 1.1e-6). Config errors are checked without torch.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax.errors import UsageError
from ddpm_jax.models.sd_unet import SDUNet
from ddpm_jax.weights.diffusers import read_state_dict
from ddpm_jax.weights.diffusers_sd_unet import (
    SD_UNET_DEFAULTS,
    read_sd_unet_folder,
    sd_unet_from_config,
)

# SD 1.x's unet/config.json structure at a tiny width (SD: (320, 640, 1280, 1280), 768).
SD1_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [16, 32, 32],
    "center_input_sample": False,
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# SD 2.x: linear projections, head counts per level (SD 2: [5, 10, 20, 20], 64 wide each),
# upcast attention, a 1024-wide context (here 40).
SD2_CONFIG = {
    **SD1_CONFIG,
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 40,
    "use_linear_projection": True,
    "upcast_attention": True,
    "layers_per_block": [1, 2, 1],
}

# A smaller model for the tests that compile it several times.
TWO_LEVELS = {
    "block_out_channels": [16, 32],
    "attention_head_dim": [2, 4],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


def _reference(config, seed):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    ref = diffusers.UNet2DConditionModel(**kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def _rel_l2(ours, ref) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(
    "config, safe", [(SD1_CONFIG, True), (SD2_CONFIG, False)], ids=["sd1_safetensors", "sd2_bin"]
)
def test_matches_diffusers(tmp_path, config, safe):
    torch = pytest.importorskip("torch")
    ref = _reference(config, seed=0)
    ref.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    spec, variables = read_sd_unet_folder(tmp_path)  # a pipeline folder: finds unet/

    # Every weight of the file is used and every parameter assigned, element for element.
    weights = next((tmp_path / "unet").glob("diffusion_pytorch_model.*"))
    state_dict = read_state_dict(weights)
    flat = traverse_util.flatten_dict(variables["params"])
    assert len(flat) == len(state_dict)
    assert sum(v.size for v in flat.values()) == sum(v.size for v in state_dict.values())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    context = rng.standard_normal((3, 5, config["cross_attention_dim"])).astype(np.float32)
    t = np.array([1, 500, 999], np.int32)
    with torch.no_grad():
        expected = ref(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t.astype(np.int64)),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample.numpy()
    expected = expected.transpose(0, 2, 3, 1)
    ours = np.asarray(jax.jit(spec.module.apply)(variables, x, t, context))
    for i in range(3):  # each timestep separately
        assert _rel_l2(ours[i], expected[i]) <= 1e-4, (t[i], _rel_l2(ours[i], expected[i]))


def test_kernels_agree_and_jvp_works():
    """The "xla" and "cpu" kernel families give the same function; "xla" is jvp-able; bfloat16
    computes in bfloat16 and returns float32."""
    spec = sd_unet_from_config({**SD2_CONFIG, **TWO_LEVELS})
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    context = jax.random.normal(jax.random.key(2), (1, 3, 40))
    t = jnp.array([7])
    rng = np.random.default_rng(0)  # random values for every parameter, without compiling init
    shapes = jax.eval_shape(spec.module.init, jax.random.key(0), x, t, context)
    variables = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
    apply = lambda module: jax.jit(lambda v, x: module.apply(v, x, t, context))
    xla = apply(spec.module.clone(kernels="xla"))
    a, tangent = jax.jit(lambda x: jax.jvp(lambda x: xla(variables, x), (x,), (x,)))(x)
    assert tangent.shape == x.shape and np.isfinite(tangent).all()
    np.testing.assert_allclose(a, apply(spec.module.clone(kernels="cpu"))(variables, x), atol=1e-5)
    c = apply(spec.module.clone(dtype=jnp.bfloat16))(variables, x)
    assert c.dtype == jnp.float32 and _rel_l2(np.asarray(c), np.asarray(a)) < 0.05


@pytest.mark.parametrize(
    "change, match",
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]}, "down_block"),
        ({"attention_head_dim": [1, 2]}, "attention_head_dim"),
        ({"attention_head_dim": 3}, "divisible"),
        ({"shiny_new_option": 1}, "shiny_new_option"),
        ({"_class_name": "UNet2DModel"}, "_class_name"),
    ],
)
def test_unsupported_config_is_refused(tmp_path, change, match):
    (tmp_path / "unet").mkdir()
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps({**SD1_CONFIG, **change}))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=match) as info:
        read_sd_unet_folder(tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_damaged_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SD1_CONFIG))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 40)
    with pytest.raises(UsageError, match="damaged") as info:
        read_sd_unet_folder(tmp_path)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def test_defaults_are_diffusers_defaults():
    diffusers = pytest.importorskip("diffusers")
    import inspect

    params = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert set(defaults) == set(SD_UNET_DEFAULTS)
    for key, value in SD_UNET_DEFAULTS.items():
        assert defaults[key] == value, key


def test_sd_sizes_build():
    """SD 1.x's real configuration builds (shapes only: 859,520,964 parameters)."""
    module = SDUNet(context_dim=768, out_channels=4)
    shapes = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jnp.zeros((1, 64, 64, 4)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 77, 768)),
    )
    total = sum(np.prod(v.shape) for v in jax.tree.leaves(shapes))
    assert total == 859_520_964
