"""A diffusers DDPM / DDIM pipeline folder: our UNet, its weights and its training schedule.

Two layouts load (:func:`load_diffusers_pipeline`):

- flat, as in the early ``google/ddpm-*`` repositories: ``config.json``, the weights and
  ``scheduler_config.json`` side by side;
- pipeline, as ``DDPMPipeline.save_pretrained`` writes it: ``model_index.json``, ``unet/`` and
  ``scheduler/``. Its components must be a ``unet`` and a ``scheduler`` (a pipeline with a VAE
  or a text encoder is refused: it is not a pixel-space DDPM).

``scheduler_config.json`` (``DDPMScheduler`` or ``DDIMScheduler``; a key it leaves out takes
diffusers' default, :data:`SCHEDULER_DEFAULTS`) maps onto (:func:`settings_from_scheduler_config`):

- the :class:`~ddpm_jax.schedules.Schedule` from ``num_train_timesteps`` and ``trained_betas``
  or ``beta_schedule``: ``"linear"`` (``beta_start`` … ``beta_end``), ``"scaled_linear"``
  (linear in √β), ``"squaredcos_cap_v2"`` (Nichol & Dhariwal's cosine, β ≤ 0.999), computed in
  float64 (diffusers computes them in float32: ᾱ agrees to 1e-6 relative, 1.3e-5 at the last
  cosine step where β = 0.999);
- ``prediction_type`` ``"epsilon"`` / ``"sample"`` / ``"v_prediction"`` → ``"eps"`` / ``"x0"`` /
  ``"v"`` (the legacy boolean ``predict_epsilon`` too);
- ``clip_sample`` / ``clip_sample_range`` → ``clip_x0`` (None when ``clip_sample`` is false). The
  ``"ddpm"`` step then takes the posterior mean of the clipped x̂_0, as ``DDPMScheduler`` does;
  ``"ddim"`` recomputes ε̂ from it, as ``DDIMScheduler.step(..., use_clipped_model_output=True)``
  does (``DDIMPipeline``'s default keeps the unclipped ε̂, a different sampler);
- ``variance_type`` ``"fixed_small"`` (or ``"fixed_small_log"``, the same distribution) /
  ``"fixed_large"`` → ``variance``, for ``samplers.sample(method="ddpm")``.

Refused with one line naming the key: learned variances (``"learned"``, ``"learned_range"``) and
``"fixed_large_log"``, ``thresholding`` true, ``rescale_betas_zero_snr`` true, other beta
schedules, an unknown key. Ignored (:data:`IGNORED_SCHEDULER_KEYS`): keys starting with ``_``,
and those that only configure diffusers' own inference loop, not the trained model —
``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one`` (choose our grid with
``samplers.sample(..., timestep_spacing=...)``: ``"uniform"`` equals diffusers' ``"leading"`` with
``steps_offset=0`` when N divides T, and our last step goes to ᾱ = 1 as with
``set_alpha_to_one=True``), ``dynamic_thresholding_ratio`` / ``sample_max_value`` (used only by
thresholding), and the legacy ``tensor_format`` / ``timestep_values`` of diffusers < 0.4.

Example:
    >>> pipe = load_diffusers_pipeline("ddpm-cifar10-32")
    >>> model_fn = lambda x, t: pipe.model.apply(pipe.variables, x, t)
    >>> x0 = samplers.sample(model_fn, pipe.schedule, key, (16, *pipe.image_shape),
    ...                      method="ddpm", num_steps=1000, prediction=pipe.prediction,
    ...                      clip_x0=pipe.clip_x0, variance=pipe.variance)
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ddpm_jax import schedules
from ddpm_jax.errors import UsageError
from ddpm_jax.models.unet import UNet
from ddpm_jax.weights.diffusers import find_model_files, read_config
from ddpm_jax.weights.diffusers_unet import read_unet_folder

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# diffusers' DDPMScheduler / DDIMScheduler defaults (0.42; equal where both have the key).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}
IGNORED_SCHEDULER_KEYS = (
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "tensor_format",  # diffusers < 0.4: "pt" or "np"
    "timestep_values",  # diffusers < 0.4, unused there
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
}


class SchedulerSettings(NamedTuple):
    """What a ``scheduler_config.json`` says about the model (as in :class:`DiffusersPipeline`)."""

    schedule: schedules.Schedule
    prediction: str
    clip_x0: float | None
    variance: str


class DiffusersPipeline(NamedTuple):
    """A loaded diffusers DDPM pipeline: everything ``samplers.sample`` needs.

    Attributes:
        model: our :class:`UNet` (unbound).
        variables: ``{"params": ...}`` float32, for ``model.apply(variables, x, t)``.
        schedule: the training noise schedule (T = ``schedule.num_timesteps``).
        prediction: what the model predicts: "eps", "x0" or "v".
        clip_x0: clip x̂_0 to ``[-clip_x0, clip_x0]`` while sampling, or None.
        variance: "fixed_small" or "fixed_large", for ancestral (``method="ddpm"``) sampling.
        image_shape: ``(H, W, C)`` of the samples the model was made for (``sample_size``,
            ``in_channels``), or None when the config has no ``sample_size``.
    """

    model: UNet
    variables: dict
    schedule: schedules.Schedule
    prediction: str
    clip_x0: float | None
    variance: str
    image_shape: tuple[int, int, int] | None


def _number(key, value, source, positive=False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (positive and value <= 0):
        raise UsageError(f"{source}: {key}={value!r}: must be a {'positive ' * positive}number")
    return float(value)


def _schedule(c: dict, source: str) -> schedules.Schedule:
    """The schedule of diffusers' scheduler config ``c`` (trained_betas first), in float64."""
    num_t = c["num_train_timesteps"]
    if not (isinstance(num_t, int) and not isinstance(num_t, bool) and num_t >= 2):
        raise UsageError(f"{source}: num_train_timesteps={num_t!r}: must be an int >= 2")
    if c["trained_betas"] is not None:
        try:
            betas = np.asarray(c["trained_betas"], np.float64)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{source}: trained_betas must be a list of numbers ({e})") from e
        if betas.shape != (num_t,):
            raise UsageError(
                f"{source}: trained_betas has shape {betas.shape}, num_train_timesteps={num_t}"
            )
        return _from_betas(betas, source)
    name = c["beta_schedule"]
    if name not in BETA_SCHEDULES:
        raise UsageError(
            f"{source}: beta_schedule={name!r} is not supported (supported: {BETA_SCHEDULES})"
        )
    if name == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar: s = 0.008, β ≤ 0.999
        return schedules.cosine(num_t, s=0.008, max_beta=0.999)
    start = _number("beta_start", c["beta_start"], source, positive=True)
    end = _number("beta_end", c["beta_end"], source, positive=True)
    if name == "linear":
        return _from_betas(np.linspace(start, end, num_t, dtype=np.float64), source)
    return _from_betas(np.linspace(start**0.5, end**0.5, num_t, dtype=np.float64) ** 2, source)


def _from_betas(betas: np.ndarray, source: str) -> schedules.Schedule:
    try:
        return schedules.from_betas(betas)
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from e


def settings_from_scheduler_config(config: dict, *, source: str) -> SchedulerSettings:
    """Maps a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` config onto ours.

    Args:
        config: the parsed ``scheduler_config.json``; missing keys take
            :data:`SCHEDULER_DEFAULTS`.
        source: names the file in messages.

    Returns:
        The :class:`SchedulerSettings`.

    Raises:
        UsageError: one line naming an unknown or unsupported key or value.
    """
    cls = config.get("_class_name", SCHEDULER_CLASSES[0])
    if cls not in SCHEDULER_CLASSES:
        raise UsageError(f"{source}: _class_name={cls!r} is not supported ({SCHEDULER_CLASSES})")
    c = dict(SCHEDULER_DEFAULTS)
    known = set(SCHEDULER_DEFAULTS) | set(IGNORED_SCHEDULER_KEYS) | {"predict_epsilon"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {unknown} for a {cls}")
    c.update({k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS})
    if "predict_epsilon" in config:  # diffusers < 0.10; prediction_type replaced it
        legacy = "epsilon" if config["predict_epsilon"] else "sample"
        if "prediction_type" in config and config["prediction_type"] != legacy:
            raise UsageError(
                f"{source}: predict_epsilon={config['predict_epsilon']!r} contradicts "
                f"prediction_type={config['prediction_type']!r}"
            )
        c["prediction_type"] = legacy
    for key in ("thresholding", "rescale_betas_zero_snr"):
        if c[key] not in (False, None):
            raise UsageError(f"{source}: {key}={c[key]!r} is not supported (only false)")
    if c["prediction_type"] not in PREDICTIONS:
        raise UsageError(
            f"{source}: prediction_type={c['prediction_type']!r} is not supported "
            f"(supported: {tuple(PREDICTIONS)})"
        )
    if c["variance_type"] not in VARIANCES:
        raise UsageError(
            f"{source}: variance_type={c['variance_type']!r} is not supported (supported: "
            f"{tuple(VARIANCES)}; learned variances need a UNet that predicts them)"
        )
    if not isinstance(c["clip_sample"], bool):
        raise UsageError(f"{source}: clip_sample={c['clip_sample']!r}: must be true or false")
    clip_x0 = None
    if c["clip_sample"]:
        clip_x0 = _number("clip_sample_range", c["clip_sample_range"], source, positive=True)
    return SchedulerSettings(
        _schedule(c, source),
        PREDICTIONS[c["prediction_type"]],
        clip_x0,
        VARIANCES[c["variance_type"]],
    )


def _check_model_index(path: Path) -> None:
    """A pipeline's ``model_index.json`` must list only a unet and a scheduler."""
    index = read_config(path)
    components = {k for k, v in index.items() if not k.startswith("_") and v != [None, None]}
    extra = sorted(components - {"unet", "scheduler"})
    if extra:
        raise UsageError(
            f"{path}: components {extra} are not part of a pixel-space DDPM pipeline (only unet "
            "and scheduler load)"
        )


def load_diffusers_pipeline(directory: str | Path) -> DiffusersPipeline:
    """Loads a diffusers DDPM / DDIM pipeline (e.g. ``google/ddpm-cifar10-32``).

    Args:
        directory: a flat folder (``config.json``, ``diffusion_pytorch_model.safetensors`` or
            ``.bin``, ``scheduler_config.json``) or a pipeline folder (``model_index.json``,
            ``unet/``, ``scheduler/``).

    Returns:
        The :class:`DiffusersPipeline`.

    Raises:
        UsageError: a missing or damaged file, a model or scheduler option we do not implement,
            missing / unexpected / misshaped weights (one line naming the file and the key).
    """
    directory = Path(directory)
    if (directory / MODEL_INDEX_NAME).is_file():
        _check_model_index(directory / MODEL_INDEX_NAME)
    find_model_files(directory, "unet")  # a missing model first, then a missing scheduler
    scheduler_path = directory / SCHEDULER_CONFIG_NAME
    if not scheduler_path.is_file() and (directory / "scheduler").is_dir():
        scheduler_path = directory / "scheduler" / SCHEDULER_CONFIG_NAME
    if not scheduler_path.is_file():
        raise UsageError(
            f"{scheduler_path} not found: a pipeline needs the scheduler_config.json the model "
            "was trained with (next to config.json, or in scheduler/)"
        )
    settings = settings_from_scheduler_config(
        read_config(scheduler_path), source=str(scheduler_path)
    )
    spec, variables = read_unet_folder(directory)
    image_shape = None if spec.sample_size is None else (*spec.sample_size, spec.in_channels)
    return DiffusersPipeline(spec.module, variables, *settings, image_shape)
