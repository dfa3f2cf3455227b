"""Tests of ddpm_jax.weights.stable_diffusion: whole ``StableDiffusionPipeline`` folders.

Known answers from diffusers + transformers (skipped without them): a tiny random SD 2.x-like
pipeline (v-prediction, DDIM scheduler, pad token "!") written with ``save_pretrained`` loads
with every component equal to its reference (UNet, text encoder, tokenizer ids, VAE scaling
factor, ᾱ table, diffusers' step grids for each spacing); a damaged or incomplete folder raises
one line naming the file and the key.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from test_sd_text import _clip_text_model, _write_vocab
from test_sd_unet import SD2_CONFIG, TWO_LEVELS

from ddpm_jax import schedules
from ddpm_jax.errors import UsageError
from ddpm_jax.weights import load_stable_diffusion
from ddpm_jax.weights.stable_diffusion import SDSpacing, scheduler_from_config

UNET = {**SD2_CONFIG, **TWO_LEVELS, "cross_attention_dim": 32}
SD2_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny SD 2.x-like pipeline folder and its reference components."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("sd")
    scheduler = diffusers.DDIMScheduler.from_config(SD2_SCHEDULER)
    pipe = tiny_pipeline(root, UNET, pad="!", activation="gelu", scheduler=scheduler)
    return root / "pipe", pipe


def tiny_pipeline(root, unet_config, *, pad, activation, scheduler, perturb=False):
    """A random ``StableDiffusionPipeline`` with ``unet_config``, a two-level VAE (8×8 latents
    of 16×16 images) and a tiny CLIP text encoder (``activation``, pad token ``pad``), saved
    to ``root/pipe``. ``perturb``: weights moved off diffusers' zero initialisations, so that
    every layer matters."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    _write_vocab(root / "vocab", pad)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "vocab")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config.items() if k[0] != "_"})
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )
    if perturb:
        with torch.no_grad():
            for p in [*unet.parameters(), *vae.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
    text_encoder = _clip_text_model(activation, seed=2, vocab_size=len(tokenizer))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    return pipe


def test_loads_every_component(pipeline_dir):
    torch = pytest.importorskip("torch")
    path, pipe = pipeline_dir
    sd = load_stable_diffusion(path)
    assert sd.prediction == "v" and sd.scaling_factor == pytest.approx(0.18215)
    assert sd.spacing == SDSpacing("leading", 1, False)
    assert sd.latent_shape == (8, 8, 4) and sd.configs["unet"]["use_linear_projection"]
    np.testing.assert_allclose(
        sd.schedule.alpha_bars, pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-5
    )

    prompts = ["A photo of an ASTRONAUT riding a horse on Mars!", "", "café " * 40]
    tokens = sd.tokenizer.encode(prompts)
    expected_tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True
    ).input_ids
    np.testing.assert_array_equal(tokens, expected_tokens)

    context = sd.text_encoder.apply(sd.text_encoder_variables, tokens)
    t = np.array([1, 500, 999], np.int32)
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref_context = pipe.text_encoder(torch.from_numpy(tokens.astype(np.int64)))[0]
        ref = (
            pipe.unet(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(t.astype(np.int64)),
                encoder_hidden_states=ref_context,
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    rel = np.linalg.norm(context - ref_context.numpy()) / np.linalg.norm(ref_context.numpy())
    assert rel <= 1e-5
    out = np.asarray(jax.jit(sd.unet.apply)(sd.unet_variables, x, t, context))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-4


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [7, 50, 1000])
def test_spacing_is_diffusers_ddim_grid(spacing, num_steps):
    diffusers = pytest.importorskip("diffusers")
    config = {**SD2_SCHEDULER, "timestep_spacing": spacing}
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(num_steps)
    ours = scheduler_from_config({"_class_name": "DDIMScheduler", **config}, source="s.json")
    np.testing.assert_array_equal(ours.spacing.timesteps(1000, num_steps), ref.timesteps.numpy())
    assert ours.spacing.final_alpha_bar(ours.schedule) == pytest.approx(
        float(ref.final_alpha_cumprod)
    )


def test_scheduler_classes_and_schedules():
    euler = {
        "_class_name": "EulerDiscreteScheduler",
        "use_karras_sigmas": True,
        "beta_schedule": "squaredcos_cap_v2",
    }
    s = scheduler_from_config(euler, source="s.json")
    assert s.prediction == "eps" and s.spacing == SDSpacing("linspace", 0, True)
    np.testing.assert_allclose(s.schedule.alpha_bars, schedules.cosine(1000).alpha_bars)
    linear = scheduler_from_config(
        {"_class_name": "PNDMScheduler", "beta_schedule": "linear"}, source="s"
    )
    np.testing.assert_allclose(
        linear.schedule.alpha_bars, schedules.linear(1000).alpha_bars, rtol=1e-6
    )
    for change, key in [
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name"),
        ({"use_flow_sigmas": True}, "use_flow_sigmas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"mystery": 1}, "mystery"),
    ]:
        with pytest.raises(UsageError, match=key):
            scheduler_from_config(
                {"_class_name": "DDIMScheduler", **SD2_SCHEDULER, **change}, source="s"
            )


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _one_line(info, path):
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


def test_bad_folders_are_refused(pipeline_dir, tmp_path):
    path, _ = pipeline_dir

    def copy(name):
        shutil.copytree(path, tmp_path / name)
        return tmp_path / name

    broken = copy("no_text_encoder")
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(UsageError, match="text_encoder") as info:
        load_stable_diffusion(broken)
    _one_line(info, broken / "text_encoder")

    broken = copy("index")
    _edit_json(broken / "model_index.json", text_encoder=[None, None])
    with pytest.raises(UsageError, match="'text_encoder' is missing") as info:
        load_stable_diffusion(broken)
    _one_line(info, broken / "model_index.json")

    broken = copy("sdxl_key")
    _edit_json(broken / "unet" / "config.json", addition_embed_type="text_time")
    with pytest.raises(UsageError, match="addition_embed_type") as info:
        load_stable_diffusion(broken)
    _one_line(info, broken / "unet" / "config.json")

    broken = copy("damaged_vae")
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UsageError, match="damaged") as info:
        load_stable_diffusion(broken)
    _one_line(info, weights)

    broken = copy("missing_weight")
    from safetensors.numpy import load_file, save_file

    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["mid_block.attentions.0.proj_in.weight"]
    save_file(state, weights)
    with pytest.raises(UsageError, match="mid_block.attentions.0.proj_in.weight") as info:
        load_stable_diffusion(broken)
    _one_line(info, weights)

    broken = copy("scheduler")
    _edit_json(broken / "scheduler" / "scheduler_config.json", thresholding=True)
    with pytest.raises(UsageError, match="thresholding") as info:
        load_stable_diffusion(broken)
    _one_line(info, broken / "scheduler" / "scheduler_config.json")
