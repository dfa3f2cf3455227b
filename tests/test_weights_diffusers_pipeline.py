"""Tests of ddpm_jax.weights.diffusers_pipeline: DDPM / DDIM pipeline folders.

Known answers from diffusers (skipped without torch / diffusers): the ᾱ table of its
``DDPMScheduler`` / ``DDIMScheduler`` for every supported beta schedule, and deterministic DDIM
(η = 0) on a loaded random-weight pipeline, driven as ``DDIMPipeline`` drives it
(``set_timesteps``, then ``step`` per timestep) from the same x_T. The scheduler mapping and the
refusals are checked without torch.
"""

import inspect
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import samplers
from ddpm_jax.errors import UsageError
from ddpm_jax.weights import load_diffusers_pipeline
from ddpm_jax.weights.diffusers import read_config
from ddpm_jax.weights.diffusers_pipeline import (
    SCHEDULER_DEFAULTS,
    settings_from_scheduler_config,
)

# A small UNet2DModel in the DDPM checkpoints' numerics (16x16, attention at 8x8).
UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "downsample_padding": 0,
    "attention_head_dim": None,
}
# The google/ddpm-* scheduler_config.json as published (diffusers 0.1.1 keys).
DDPM_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def _diffusers():
    return pytest.importorskip("torch"), pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference_unet():
    torch, diffusers = _diffusers()
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**{k: v for k, v in UNET_CONFIG.items() if k[0] != "_"})
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def _trained_betas():
    return list(np.linspace(1e-4, 0.03, 1000) * (1 + 0.1 * np.sin(np.arange(1000))))


@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize(
    "options",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=_trained_betas()),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"],
)
def test_alpha_bars_match_diffusers(tmp_path, scheduler_class, options):
    _, diffusers = _diffusers()
    scheduler = getattr(diffusers, scheduler_class)(num_train_timesteps=1000, **options)
    scheduler.save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    settings = settings_from_scheduler_config(read_config(path), source=str(path))
    ours = np.asarray(settings.schedule.alpha_bars, np.float64)
    theirs = scheduler.alphas_cumprod.numpy().astype(np.float64)
    # Ours: float64 tables rounded to float32. diffusers: float32 betas and cumulative product,
    # whose rounding grows along the 1000 steps: measured ≤ 1e-6 relative, except at the last
    # cosine step, where β = 0.999 rounded to float32 moves 1 - β = 1e-3 by ~1e-5 (measured
    # 1.3e-5; ours is the float64 value).
    np.testing.assert_allclose(ours[:-1], theirs[:-1], rtol=2e-6, atol=0)
    np.testing.assert_allclose(ours, theirs, rtol=3e-5, atol=0)
    np.testing.assert_allclose(settings.schedule.betas, scheduler.betas.numpy(), rtol=1e-6)


def _save_pipeline(ref, directory, scheduler, *, flat=False, safe=True):
    """The pipeline layout (model_index.json, unet/, scheduler/), or the early flat one."""
    _, diffusers = _diffusers()
    if flat:
        ref.save_pretrained(directory, safe_serialization=safe)
        scheduler.save_pretrained(directory)
    else:
        diffusers.DDIMPipeline(unet=ref, scheduler=scheduler).save_pretrained(
            directory, safe_serialization=safe
        )
    return directory


def test_flat_and_pipeline_layouts_load_the_same(tmp_path, reference_unet):
    _, diffusers = _diffusers()
    scheduler = diffusers.DDPMScheduler(
        **{k: v for k, v in DDPM_SCHEDULER_CONFIG.items() if k in SCHEDULER_DEFAULTS}
    )
    flat = _save_pipeline(reference_unet, tmp_path / "flat", scheduler, flat=True, safe=False)
    (flat / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER_CONFIG))  # as published
    nested = _save_pipeline(reference_unet, tmp_path / "nested", scheduler)
    assert (nested / "model_index.json").is_file() and (
        flat / "diffusion_pytorch_model.bin"
    ).is_file()
    a, b = load_diffusers_pipeline(flat), load_diffusers_pipeline(nested)
    fa, fb = (traverse_util.flatten_dict(p.variables) for p in (a, b))
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    for pipe in (a, b):
        assert pipe.model == a.model and pipe.image_shape == (16, 16, 3)
        assert (pipe.prediction, pipe.clip_x0, pipe.variance) == ("eps", 1.0, "fixed_small")
        assert pipe.schedule.num_timesteps == 1000
        np.testing.assert_array_equal(pipe.schedule.alpha_bars, a.schedule.alpha_bars)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers_ddim_scheduler(tmp_path, reference_unet, clip):
    torch, diffusers = _diffusers()
    num_steps = 10
    scheduler = diffusers.DDIMScheduler(
        clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"
    )
    pipe = load_diffusers_pipeline(_save_pipeline(reference_unet, tmp_path, scheduler))
    assert pipe.clip_x0 == (1.0 if clip else None)

    # diffusers' "leading" grid with steps_offset=0 is our "uniform" one (N divides T).
    scheduler.set_timesteps(num_steps)
    grid = samplers.timesteps(pipe.schedule, num_steps, "uniform")
    np.testing.assert_array_equal(grid, scheduler.timesteps.numpy())

    x_T = np.random.default_rng(0).normal(size=(2, *pipe.image_shape)).astype(np.float32)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2))
    clipped = False
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = reference_unet(x, t).sample
            # Our samplers recompute ε̂ from the clipped x̂_0 (no effect without clipping).
            out = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True)
            x = out.prev_sample
            clipped |= bool(out.pred_original_sample.abs().max() == 1.0)
    assert clipped == clip  # the clipping case really clips
    theirs = x.numpy().transpose(0, 2, 3, 1)

    model_fn = lambda x, t: pipe.model.apply(pipe.variables, x, t)  # noqa: E731
    ours = jax.jit(  # LLVM -O0: compiles faster, computes the same
        lambda x_T: samplers.sample(
            model_fn,
            pipe.schedule,
            jax.random.key(0),
            x_T.shape,
            method="ddim",
            num_steps=num_steps,
            eta=0.0,
            prediction=pipe.prediction,
            clip_x0=pipe.clip_x0,
            timestep_spacing="uniform",
            x_T=x_T,
        ),
        compiler_options={"xla_backend_optimization_level": 0},
    )(x_T)
    ours = np.asarray(ours)
    assert np.abs(theirs).std() > 0.1
    # float32 through 10 network evaluations and the x̂_0 / ε̂ conversions (1 / √ᾱ_t ≈ 61 at
    # t = 900, the first step); measured 6e-7 relative without clipping, 2e-6 with.
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel <= 1e-4, rel


# --- the scheduler mapping, and refusals: one line naming the file and the key --------------


def test_scheduler_options_map_onto_ours():
    def settings(**change):
        return settings_from_scheduler_config({**DDPM_SCHEDULER_CONFIG, **change}, source="s")

    assert settings().prediction == "eps" and settings().clip_x0 == 1.0
    assert settings(prediction_type="sample").prediction == "x0"
    assert settings(prediction_type="v_prediction").prediction == "v"
    assert settings(predict_epsilon=False).prediction == "x0"  # legacy keys
    legacy = settings(tensor_format="pt", timestep_values=None)
    assert legacy[1:] == settings()[1:] and legacy.schedule.num_timesteps == 1000
    assert settings(clip_sample=False).clip_x0 is None
    assert settings(clip_sample_range=2.0).clip_x0 == 2.0
    assert settings(variance_type="fixed_large").variance == "fixed_large"
    assert settings(variance_type="fixed_small_log").variance == "fixed_small"
    # DDIM's config: no variance_type; its inference-loop options are ignored.
    ddim = dict(_class_name="DDIMScheduler", set_alpha_to_one=False, steps_offset=1)
    assert settings(**ddim).variance == "fixed_small"
    assert settings(num_train_timesteps=4000).schedule.num_timesteps == 4000


def test_defaults_are_diffusers_defaults():
    _, diffusers = _diffusers()
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        for key, value in SCHEDULER_DEFAULTS.items():
            if key in params:
                assert params[key].default == value, (cls, key)


def _folder(tmp_path, scheduler_config, model_index=None):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(UNET_CONFIG))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    if scheduler_config is not None:
        (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    if model_index is not None:
        (folder / "model_index.json").write_text(json.dumps(model_index))
    return folder


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(variance_type="learned_range"), "variance_type='learned_range'"),
        (dict(variance_type="learned"), "variance_type='learned'"),
        (dict(prediction_type="x_start"), "prediction_type='x_start'"),
        (dict(thresholding=True), "thresholding=True"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(trained_betas=[0.1, 0.2]), r"trained_betas has shape \(2,\)"),
        (dict(beta_end=1.5), r"betas must lie in \(0, 1\)"),
        (dict(solver_order=2), r"unknown key\(s\) \['solver_order'\]"),
        (dict(_class_name="EulerDiscreteScheduler"), "'EulerDiscreteScheduler'"),
        (dict(predict_epsilon=True, prediction_type="sample"), "contradicts"),
    ],
)
def test_unsupported_scheduler_options_are_refused(tmp_path, change, match):
    folder = _folder(tmp_path, {**DDPM_SCHEDULER_CONFIG, **change})
    with pytest.raises(UsageError, match=match) as info:
        load_diffusers_pipeline(folder)
    message = str(info.value)
    assert str(folder / "scheduler_config.json") in message and "\n" not in message


def test_missing_scheduler_and_foreign_components_are_refused(tmp_path):
    folder = _folder(tmp_path, None)
    with pytest.raises(UsageError, match="scheduler_config.json not found"):
        load_diffusers_pipeline(folder)
    index = {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"]}
    index |= {"scheduler": ["diffusers", "DDIMScheduler"], "vqvae": ["diffusers", "VQModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"model_index.json: components \['vqvae'\]"):
        load_diffusers_pipeline(folder)
    with pytest.raises(UsageError, match="config.json not found"):
        load_diffusers_pipeline(tmp_path / "nowhere")
