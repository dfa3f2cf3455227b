"""A diffusers ``StableDiffusionPipeline`` folder (SD 1.x / 2.x) loaded without torch or
transformers: :func:`load_stable_diffusion`.

The folder holds ``model_index.json`` and one folder per component: ``unet/``
(:mod:`ddpm_jax.weights.diffusers_sd_unet`), ``vae/`` (:mod:`ddpm_jax.weights.diffusers`),
``text_encoder/`` (:mod:`ddpm_jax.weights.clip_weights`), ``tokenizer/``
(:mod:`ddpm_jax.weights.clip_tokenizer`) and ``scheduler/``. ``safety_checker``,
``feature_extractor`` and ``image_encoder`` are not loaded; any other component (SDXL's
``text_encoder_2``, for example) is refused.

``scheduler/scheduler_config.json`` (any of :data:`SD_SCHEDULER_CLASSES`; SD 1.x publishes a
``PNDMScheduler``, SD 2.x a ``DDIMScheduler`` or ``EulerDiscreteScheduler``) gives
(:func:`scheduler_from_config`):

- the training :class:`~ddpm_jax.schedules.Schedule` (``num_train_timesteps``, ``beta_schedule``
  ``scaled_linear`` / ``linear`` / ``squaredcos_cap_v2`` or ``trained_betas``) and the
  prediction (``epsilon`` → ``"eps"``, ``v_prediction`` → ``"v"``), as
  :func:`ddpm_jax.weights.diffusers_pipeline.settings_from_scheduler_config` reads them;
- how diffusers spaces its sampling steps (:class:`SDSpacing`: ``timestep_spacing``
  ``leading`` / ``trailing`` / ``linspace``, ``steps_offset``, ``set_alpha_to_one``);
- keys that only configure a diffusers sampler (``solver_order``, ``use_karras_sigmas``,
  ``skip_prk_steps``, ...: :data:`SAMPLER_ONLY_KEYS`) are ignored; flow matching, thresholding,
  zero-terminal-SNR rescaling, learned variances and unknown keys are refused.

Every error is a :class:`~ddpm_jax.errors.UsageError` of one line naming the file and the key.

Example:
    >>> sd = load_stable_diffusion("stable-diffusion-v1-5")
    >>> tokens = sd.tokenizer.encode(["an astronaut riding a horse", ""])  # int32 [2, 77]
    >>> context = sd.text_encoder.apply(sd.text_encoder_variables, tokens)  # [2, 77, 768]
    >>> eps = sd.unet.apply(sd.unet_variables, latents, t, context)  # latents [2, 64, 64, 4]
    >>> image = sd.vae.apply(sd.vae_variables, latents0 / sd.scaling_factor,
    ...                      method=AutoencoderKL.decode)
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ddpm_jax import schedules
from ddpm_jax.errors import UsageError
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.clip_text import CLIPTextTransformer
from ddpm_jax.models.sd_unet import SDUNet
from ddpm_jax.weights.clip_tokenizer import ClipTokenizer, load_clip_tokenizer
from ddpm_jax.weights.clip_weights import load_clip_text_encoder
from ddpm_jax.weights.diffusers import load_diffusers_vae, read_config
from ddpm_jax.weights.diffusers_pipeline import (
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_DEFAULTS,
    settings_from_scheduler_config,
)
from ddpm_jax.weights.diffusers_sd_unet import read_sd_unet_folder

MODEL_INDEX_NAME = "model_index.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")
# Scheduler class -> (timestep_spacing, set_alpha_to_one) defaults of diffusers 0.42. Only DDIM
# and PNDM have set_alpha_to_one; the sigma-based samplers end at sigma = 0 (alpha_bar = 1).
SD_SCHEDULER_CLASSES = {
    "PNDMScheduler": ("leading", False),
    "DDIMScheduler": ("leading", True),
    "DDPMScheduler": ("leading", True),
    "EulerDiscreteScheduler": ("linspace", True),
    "EulerAncestralDiscreteScheduler": ("linspace", True),
    "LMSDiscreteScheduler": ("linspace", True),
    "HeunDiscreteScheduler": ("linspace", True),
    "KDPM2DiscreteScheduler": ("linspace", True),
    "DPMSolverMultistepScheduler": ("linspace", True),
    "UniPCMultistepScheduler": ("linspace", True),
    "DEISMultistepScheduler": ("linspace", True),
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Keys that configure one of diffusers' samplers, not the trained model: ignored.
SAMPLER_ONLY_KEYS = (
    "algorithm_type",
    "disable_corrector",
    "dynamic_thresholding_ratio",
    "euler_at_final",
    "final_sigmas_type",
    "interpolation_type",
    "lambda_min_clipped",
    "lower_order_final",
    "predict_x0",
    "sample_max_value",
    "sigma_max",
    "sigma_min",
    "skip_prk_steps",
    "solver_order",
    "solver_p",
    "solver_type",
    "timestep_type",
    "use_beta_sigmas",
    "use_exponential_sigmas",
    "use_karras_sigmas",
    "use_lu_lambdas",
)
# Keys that would change the model's meaning: key -> the only value we accept.
REFUSED_UNLESS = {
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "flow_shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}


class SDSpacing(NamedTuple):
    """How diffusers places its sampling steps (``scheduler_config.json``).

    Attributes:
        timestep_spacing: "leading", "trailing" or "linspace".
        steps_offset: added to every "leading" timestep (SD: 1).
        set_alpha_to_one: DDIM / PNDM's last step goes to ᾱ = 1 (else to ᾱ of timestep 0).
    """

    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool

    def timesteps(self, num_train_timesteps: int, num_steps: int) -> np.ndarray:
        """diffusers' ``set_timesteps(num_steps)`` grid: int64 [num_steps], decreasing.

        - "linspace": ``round(linspace(0, T - 1, N))`` reversed;
        - "leading": ``arange(N) * (T // N) + steps_offset`` reversed (SD 1.x with 50 steps:
          981, 961, ..., 1);
        - "trailing": ``round(arange(T, 0, -T / N)) - 1`` (starts at T - 1).
        """
        t, n = num_train_timesteps, num_steps
        if not (isinstance(n, int) and 1 <= n <= t):
            raise ValueError(f"num_steps must be an int in [1, {t}], got {n!r}")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, t - 1, n).round()[::-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            grid = (np.arange(0, n) * (t // n)).round()[::-1].astype(np.int64)
            return grid + self.steps_offset
        return np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1

    def final_alpha_bar(self, schedule: schedules.Schedule) -> float:
        """ᾱ after the last step: 1, or ᾱ of timestep 0 when ``set_alpha_to_one`` is false."""
        return 1.0 if self.set_alpha_to_one else float(schedule.alpha_bars[0])


class SDScheduler(NamedTuple):
    """A ``scheduler_config.json`` read for Stable Diffusion (:func:`scheduler_from_config`)."""

    schedule: schedules.Schedule
    prediction: str
    spacing: SDSpacing


class StableDiffusion(NamedTuple):
    """A loaded Stable-Diffusion pipeline.

    Attributes:
        unet: :class:`SDUNet`; ``unet.apply(unet_variables, x, t, context)`` with latents ``x``
            [B, H, W, C] NHWC, ``t`` int32 [B] in [0, T), ``context`` [B, 77, D] → ε or v
            [B, H, W, C] float32.
        unet_variables: ``{"params": ...}`` float32.
        text_encoder: :class:`CLIPTextTransformer`; ``apply(text_encoder_variables, tokens)``
            with int32 [B, 77] → context [B, 77, D] float32.
        text_encoder_variables: ``{"params": ...}`` float32.
        tokenizer: :class:`ClipTokenizer`; ``encode(prompts)`` → int32 [B, 77].
        vae: :class:`AutoencoderKL` (``method=AutoencoderKL.encode`` / ``decode``).
        vae_variables: ``{"params": ...}`` float32.
        scaling_factor: latents for the UNet are ``scaling_factor * (z - vae.shift_factor)``.
        schedule: the training noise schedule.
        prediction: "eps" or "v" ("x0" for a ``sample`` model).
        spacing: diffusers' sampling-step placement (:class:`SDSpacing`).
        latent_shape: ``(H, W, C)`` of the latents the UNet was trained at, or None.
        configs: the parsed JSON files, by component: ``model_index``, ``unet``, ``vae``,
            ``text_encoder``, ``scheduler``.
    """

    unet: SDUNet
    unet_variables: dict
    text_encoder: CLIPTextTransformer
    text_encoder_variables: dict
    tokenizer: ClipTokenizer
    vae: AutoencoderKL
    vae_variables: dict
    scaling_factor: float
    schedule: schedules.Schedule
    prediction: str
    spacing: SDSpacing
    latent_shape: tuple[int, int, int] | None
    configs: dict


def scheduler_from_config(config: dict, *, source: str) -> SDScheduler:
    """Maps a diffusers scheduler config of an SD pipeline onto ours.

    Args:
        config: the parsed ``scheduler_config.json``.
        source: names the file in messages.

    Returns:
        The :class:`SDScheduler`.

    Raises:
        UsageError: one line naming an unknown class or key, or a value we do not compute.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    if cls not in SD_SCHEDULER_CLASSES:
        raise UsageError(
            f"{source}: _class_name={cls!r} is not supported ({tuple(SD_SCHEDULER_CLASSES)})"
        )
    spacing_default, alpha_one_default = SD_SCHEDULER_CLASSES[cls]
    model_keys = set(SCHEDULER_DEFAULTS) - {"variance_type", "clip_sample", "clip_sample_range"}
    spacing_keys = {"timestep_spacing", "steps_offset", "set_alpha_to_one"}
    known = model_keys | spacing_keys | set(SAMPLER_ONLY_KEYS) | set(REFUSED_UNLESS)
    known |= {"variance_type", "clip_sample", "clip_sample_range", "predict_epsilon"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {unknown} for a {cls}")
    for key, allowed in REFUSED_UNLESS.items():
        if key in config and config[key] != allowed:
            raise UsageError(f"{source}: {key}={config[key]!r} is not supported (only {allowed!r})")
    if config.get("variance_type") in ("learned", "learned_range"):
        raise UsageError(
            f"{source}: variance_type={config['variance_type']!r}: learned variances are not "
            "supported"
        )
    model = {k: v for k, v in config.items() if k in model_keys or k == "predict_epsilon"}
    settings = settings_from_scheduler_config(
        {**model, "_class_name": "DDPMScheduler", "clip_sample": False}, source=source
    )
    spacing = config.get("timestep_spacing", spacing_default)
    if spacing not in TIMESTEP_SPACINGS:
        raise UsageError(
            f"{source}: timestep_spacing={spacing!r} is not supported ({TIMESTEP_SPACINGS})"
        )
    offset = config.get("steps_offset", 0)
    if not (isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0):
        raise UsageError(f"{source}: steps_offset={offset!r}: must be a non-negative int")
    alpha_one = config.get("set_alpha_to_one", alpha_one_default)
    if not isinstance(alpha_one, bool):
        raise UsageError(f"{source}: set_alpha_to_one={alpha_one!r}: must be true or false")
    return SDScheduler(
        settings.schedule, settings.prediction, SDSpacing(spacing, offset, alpha_one)
    )


def _check_model_index(directory: Path) -> dict:
    """``model_index.json``: every SD component listed, none we cannot load."""
    path = directory / MODEL_INDEX_NAME
    if not path.is_file():
        raise UsageError(
            f"{path} not found: pass a StableDiffusionPipeline folder (save_pretrained's output)"
        )
    index = read_config(path)
    listed = {k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")}
    for name in COMPONENTS:
        if name not in listed or index[name] in ([None, None], [], None):
            raise UsageError(f"{path}: component {name!r} is missing (need {COMPONENTS})")
        if not (directory / name).is_dir():
            raise UsageError(f"{directory / name} not found (listed as {name!r} in {path})")
    extra = sorted(listed - set(COMPONENTS) - set(NOT_LOADED))
    extra = [k for k in extra if index[k] != [None, None]]
    if extra:
        raise UsageError(
            f"{path}: component(s) {extra} are not part of an SD 1.x / 2.x text-to-image "
            f"pipeline (loaded: {COMPONENTS})"
        )
    unet_class = index["unet"][-1] if isinstance(index["unet"], list) else None
    if unet_class != "UNet2DConditionModel":
        raise UsageError(f"{path}: unet={index['unet']!r}: expected UNet2DConditionModel")
    return index


def load_stable_diffusion(directory: str | Path) -> StableDiffusion:
    """Loads a diffusers ``StableDiffusionPipeline`` folder (SD 1.x / 2.x).

    Args:
        directory: the pipeline folder: ``model_index.json``, ``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (safetensors or ``.bin`` weights).

    Returns:
        The :class:`StableDiffusion` (float32 parameters).

    Raises:
        UsageError: a missing component or file, a damaged file, a config value we do not
            compute, weights that do not fit (one line naming the file and the key).
    """
    directory = Path(directory)
    index = _check_model_index(directory)
    scheduler_path = directory / "scheduler" / SCHEDULER_CONFIG_NAME
    if not scheduler_path.is_file():
        raise UsageError(f"{scheduler_path} not found: the pipeline's scheduler is missing")
    scheduler_config = read_config(scheduler_path)
    scheduler = scheduler_from_config(scheduler_config, source=str(scheduler_path))
    tokenizer = load_clip_tokenizer(directory / "tokenizer")
    text_encoder, text_variables = load_clip_text_encoder(directory / "text_encoder")
    if tokenizer.max_length > text_encoder.max_position_embeddings:
        raise UsageError(
            f"{directory / 'tokenizer'}: model_max_length={tokenizer.max_length} exceeds the text "
            f"encoder's max_position_embeddings={text_encoder.max_position_embeddings}"
        )
    if tokenizer.vocab_size > text_encoder.vocab_size:
        raise UsageError(
            f"{directory / 'tokenizer'}: {tokenizer.vocab_size} token ids, more than the text "
            f"encoder's vocab_size={text_encoder.vocab_size}"
        )
    spec, unet_variables = read_sd_unet_folder(directory / "unet")
    if spec.module.context_dim != text_encoder.hidden_size:
        raise UsageError(
            f"{directory / 'unet' / 'config.json'}: cross_attention_dim="
            f"{spec.module.context_dim} differs from the text encoder's hidden_size="
            f"{text_encoder.hidden_size}"
        )
    vae, vae_variables = load_diffusers_vae(directory / "vae")
    if vae.latent_channels != spec.in_channels:
        raise UsageError(
            f"{directory / 'unet' / 'config.json'}: in_channels={spec.in_channels} differs from "
            f"the VAE's latent_channels={vae.latent_channels}"
        )
    size = spec.sample_size
    configs = {
        "model_index": index,
        "unet": read_config(directory / "unet" / "config.json"),
        "vae": read_config(directory / "vae" / "config.json"),
        "text_encoder": read_config(directory / "text_encoder" / "config.json"),
        "scheduler": scheduler_config,
    }
    return StableDiffusion(
        unet=spec.module,
        unet_variables=unet_variables,
        text_encoder=text_encoder,
        text_encoder_variables=text_variables,
        tokenizer=tokenizer,
        vae=vae,
        vae_variables=vae_variables,
        scaling_factor=float(vae.scaling_factor),
        schedule=scheduler.schedule,
        prediction=scheduler.prediction,
        spacing=scheduler.spacing,
        latent_shape=None if size is None else (*size, spec.in_channels),
        configs=configs,
    )
