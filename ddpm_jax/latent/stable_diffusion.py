"""Text-to-image and image-to-image sampling of a loaded Stable Diffusion pipeline.

:class:`SDPipeline` takes a :class:`~ddpm_jax.weights.stable_diffusion.StableDiffusion`
(``load_stable_diffusion(DIR)``) and draws images the way diffusers' ``StableDiffusionPipeline``
and ``StableDiffusionImg2ImgPipeline`` do, step for step:

- the prompts and the negative prompt are encoded by the CLIP text encoder once per call;
- classifier-free guidance evaluates the UNet once per step on the batch ``[uncond, cond]``,
  ``ε_u + s (ε_c - ε_u)``, when the scale is > 1 (else the prompt alone, as diffusers);
- the steps are those of diffusers' ``DDIMScheduler`` (the folder's ``timestep_spacing``,
  ``steps_offset`` and ``set_alpha_to_one``; η as given) or ``DPMSolverMultistepScheduler`` with
  its defaults (DPM-Solver++(2M), first-order last step to σ = 0): :func:`step_grid`, run by
  :func:`ddpm_jax.sampler_grid.sample_on_grid`, one ``lax.scan`` inside one ``jax.jit`` with the
  VAE decoder;
- image-to-image encodes the image with the VAE (the posterior mean), keeps the last
  ``int(num_steps * strength)`` steps and starts from ``√ᾱ_t z + √(1-ᾱ_t) ε`` at the first.

Samples are drawn in rounds sharded over every device; sample ``i``'s noise ε (x_T of
text-to-image) is ``normal(fold_in(key, i))`` unless given (``noise``), so it does not depend on
the device count::

    sd = load_stable_diffusion("stable-diffusion-v1-5")
    pipe = SDPipeline(sd, SD_SETTINGS.replace(method="dpmpp_2m", num_steps=25))
    images = pipe(jax.random.key(0), 4, prompt="an astronaut riding a horse")  # uint8 [4, H, W, 3]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import images
from ddpm_jax.errors import UsageError
from ddpm_jax.models.autoencoder import AutoencoderKL, scale_latents, unscale_latents
from ddpm_jax.parallel import DataParallel, Layout, compiler_options
from ddpm_jax.sample_settings import SampleSettings
from ddpm_jax.sampler_grid import GRID_METHODS, sample_on_grid
from ddpm_jax.weights.stable_diffusion import MODEL_INDEX_NAME, SDSpacing, StableDiffusion

# diffusers' StableDiffusionPipeline defaults (50 steps, guidance 7.5); latents are never clipped.
SD_SETTINGS = SampleSettings("ddim", 50, guidance_scale=7.5, clip_x0=None, batch_size=8)


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether ``path`` is a text-to-image pipeline folder (``model_index.json`` naming a
    ``text_encoder``), as opposed to an unconditional diffusers DDPM folder."""
    index = Path(path) / MODEL_INDEX_NAME
    return index.is_file() and '"text_encoder"' in index.read_text(errors="replace")


def dpm_solver_timesteps(spacing: SDSpacing, num_train_timesteps: int, num_steps: int):
    """``DPMSolverMultistepScheduler.set_timesteps(num_steps)``: int64 [num_steps], decreasing
    (N + 1 points spaced over [0, T), the last dropped; "leading" steps by ``T // (N + 1)``)."""
    t, n = num_train_timesteps, num_steps
    if spacing.timestep_spacing == "linspace":
        return np.linspace(0, t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing.timestep_spacing == "leading":
        grid = (np.arange(0, n + 1) * (t // (n + 1))).round()[::-1][:-1].astype(np.int64)
        return grid + spacing.steps_offset
    return np.arange(t, 0, -t / n).round().astype(np.int64) - 1


def step_grid(sd: StableDiffusion, method: str, num_steps: int, strength: float = 1.0):
    """The evaluations and the levels reached of diffusers' scheduler for ``method``.

    Args:
        sd: the pipeline (its schedule and ``spacing``).
        method: "ddim" (``DDIMScheduler``: t → ᾱ of ``t - T // N``, or the final ᾱ) or
            "dpmpp_2m" (``DPMSolverMultistepScheduler``: to the next point, then σ = 0).
        num_steps: N of ``set_timesteps``.
        strength: image-to-image keeps the last ``int(N * strength)`` steps (1: all).

    Returns:
        ``(t int32 [n], alpha_bar_to float32 [n])`` for :func:`sample_on_grid`.
    """
    big_t = sd.schedule.num_timesteps
    ab = np.asarray(sd.schedule.alpha_bars, np.float32)
    if method == "ddim":
        t = sd.spacing.timesteps(big_t, num_steps)
        prev = t - big_t // num_steps
        final = np.float32(sd.spacing.final_alpha_bar(sd.schedule))
        to = np.where(prev >= 0, ab[np.maximum(prev, 0)], final)
    else:
        t = dpm_solver_timesteps(sd.spacing, big_t, num_steps)
        to = np.concatenate([ab[t[1:]], np.ones(1, np.float32)])
    keep = min(int(num_steps * strength), num_steps)
    return t[num_steps - keep :].astype(np.int32), to[num_steps - keep :].astype(np.float32)


def load_image(path: str | Path) -> np.ndarray:
    """An RGB image file as float32 [H, W, 3] in [-1, 1].

    Raises:
        UsageError: the file is missing or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--image={path}: cannot read the image ({e})") from None
    return rgb / 127.5 - 1.0


class SDPipeline:
    """Images of a Stable Diffusion pipeline, in rounds sharded over every device.

    Args:
        sd: the loaded pipeline.
        settings: ``method`` ("ddim" or "dpmpp_2m"), ``num_steps``, ``eta`` (DDIM),
            ``guidance_scale`` (the default of each call), ``clip_x0`` (None for latents) and
            ``batch_size`` (samples per round, rounded up to the device count).
        dp: the devices (default: ``DataParallel()`` over all of them).
        height, width: the image size (default: the UNet's ``sample_size`` times the VAE's
            downsampling factor), multiples of that factor.

    Raises:
        UsageError: invalid settings or size.
    """

    def __init__(
        self,
        sd: StableDiffusion,
        settings: SampleSettings = SD_SETTINGS,
        *,
        dp: Layout | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        settings.check(sd.schedule.num_timesteps, prefix="--")
        if settings.method not in GRID_METHODS:
            raise UsageError(
                f"--method={settings.method!r}: Stable Diffusion samples with one of "
                f"{list(GRID_METHODS)} (diffusers' DDIMScheduler, DPMSolverMultistepScheduler)"
            )
        if settings.spacing is not None:
            raise UsageError(
                f"--spacing={settings.spacing!r}: Stable Diffusion steps on its scheduler's grid "
                f"({sd.spacing.timestep_spacing!r} in scheduler_config.json)"
            )
        f, channels = sd.vae.downsampling_factor, sd.vae.latent_channels
        default = (None, None) if sd.latent_shape is None else sd.latent_shape[:2]
        height = default[0] * f if height is None and default[0] else height
        width = default[1] * f if width is None and default[1] else width
        for name, value in [("height", height), ("width", width)]:
            if not (isinstance(value, int) and value >= f and value % f == 0):
                raise UsageError(
                    f"--{name}={value}: expected a positive multiple of the VAE's factor {f}"
                )
        self.sd, self.settings = sd, settings
        self.dp = dp if dp is not None else DataParallel()
        self.image_shape = (height, width, sd.vae.out_channels)
        self.latent_shape = (height // f, width // f, channels)
        put = lambda tree: jax.device_put(tree, self.dp.replicated)
        self._unet_vars, self._vae_vars = put(sd.unet_variables), put(sd.vae_variables)
        self._text_vars = put(sd.text_encoder_variables)
        self._embed = jax.jit(sd.text_encoder.apply)
        self._fns: dict[tuple, Callable] = {}
        fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))  # sample i: fold_in(key, i)
        self._keys = jax.jit(fold, out_shardings=self.dp.batch_sharding)
        normal = lambda k: jax.random.normal(k, self.latent_shape, jnp.float32)
        self._draw = jax.jit(jax.vmap(normal), out_shardings=self.dp.batch_sharding)

    def embed(self, prompts: Sequence[str]) -> jax.Array:
        """CLIP embeddings of ``prompts``: [P, 77, D] float32."""
        return self._embed(self._text_vars, self.sd.tokenizer.encode(list(prompts)))

    def encode_image(self, image: np.ndarray) -> jax.Array:
        """The scaled latent of an image [H, W, 3] in [-1, 1] (the VAE posterior's mean):
        [1, h, w, C]."""
        vae = self.sd.vae
        mean, _ = jax.jit(lambda v, x: vae.apply(v, x, method=AutoencoderKL.encode))(
            self._vae_vars, jnp.asarray(image, jnp.float32)[None]
        )
        return scale_latents(mean, self.sd.scaling_factor, vae.shift_factor)

    def _fn(self, batch: int, guided: bool, img2img: bool) -> Callable:
        """The compiled round: noise → latents (one scan) → decoded images [-1, 1]."""
        if (batch, guided, img2img) in self._fns:
            return self._fns[batch, guided, img2img]
        sd, s = self.sd, self.settings

        def generate(unet_vars, vae_vars, eps, keys, table, which, uncond, z0, t, to, scale):
            cond = table[which]

            def model_fn(x, tb):
                if not guided:
                    return sd.unet.apply(unet_vars, x, tb, cond)
                ctx = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
                both = sd.unet.apply(unet_vars, jnp.concatenate([x, x]), jnp.tile(tb, 2), ctx)
                out_u, out_c = jnp.split(both, 2)
                return out_u + scale * (out_c - out_u)

            x = eps
            if img2img:
                ab = sd.schedule.alpha_bars[t[0]]
                x = jnp.sqrt(ab) * z0 + jnp.sqrt(1.0 - ab) * eps
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
            z = sample_on_grid(
                model_fn,
                sd.schedule,
                x,
                t,
                to,
                method=s.method,
                eta=s.eta if s.method == "ddim" else 0.0,
                key=step_keys,
                prediction=sd.prediction,
                clip_x0=s.clip_x0,
            )
            z = unscale_latents(z, sd.scaling_factor, sd.vae.shift_factor)
            return jnp.clip(sd.vae.apply(vae_vars, z, method=AutoencoderKL.decode), -1.0, 1.0)

        fn = jax.jit(
            generate,
            out_shardings=self.dp.batch_sharding,
            compiler_options=compiler_options(self.dp.devices),
        )
        self._fns[batch, guided, img2img] = fn
        return fn

    def __call__(
        self,
        key: jax.Array,
        num: int,
        *,
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        image: np.ndarray | None = None,
        strength: float = 0.8,
        noise: np.ndarray | None = None,
        guidance_scale: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """``num`` images of ``prompt`` (one, or cycled through a list).

        Args:
            key: sample ``i``'s noise is ``normal(fold_in(key, i))`` (and its DDIM η noise
                comes from ``fold_in(fold_in(key, i), 1)``).
            num: number of images.
            prompt: the text, or texts cycled through the samples.
            negative_prompt: the unconditional prompt of guidance ("" as diffusers).
            image: image-to-image: float32 [H, W, 3] in [-1, 1] of the pipeline's size.
            strength: image-to-image: the fraction of the steps run, in (0, 1].
            noise: float32 [num, h, w, C] latents ε (x_T of text-to-image; the noise added to
                the encoded image for image-to-image) instead of drawing them from ``key``.
            guidance_scale: overrides the settings' scale.
            progress: optional ``progress(rounds_done, rounds)``.

        Returns:
            uint8 [num, H, W, 3] on every process.

        Raises:
            UsageError: a wrong shape of ``noise`` or ``image``, or ``strength`` too small.
        """
        s = self.settings
        scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if noise is not None and tuple(np.shape(noise)) != (num, *self.latent_shape):
            raise UsageError(
                f"--noise: shape {tuple(np.shape(noise))}, expected {(num, *self.latent_shape)} "
                "(num_samples, latent height, width, channels)"
            )
        t, to = step_grid(self.sd, s.method, s.num_steps, strength if image is not None else 1)
        z0 = np.zeros((1, *self.latent_shape), np.float32)
        if image is not None:
            if tuple(np.shape(image)) != self.image_shape:
                raise UsageError(
                    f"--image: size {np.shape(image)}, expected {self.image_shape} (--height, "
                    "--width: the image's own size, a multiple of the VAE's factor)"
                )
            if not 0 < strength <= 1 or len(t) == 0:
                raise UsageError(f"--strength={strength}: int(num_steps * strength) must be >= 1")
            z0 = np.asarray(self.encode_image(image))
        distinct = list(dict.fromkeys(prompts))  # embedded once per call
        table = jax.device_put(np.asarray(self.embed(distinct)), self.dp.replicated)
        uncond = jax.device_put(np.asarray(self.embed([negative_prompt])), self.dp.replicated)
        which = np.resize(np.asarray([distinct.index(p) for p in prompts], np.int32), num)
        fn = self._fn(batch := self._batch(num), scale > 1, image is not None)
        rounds, out = -(-num // batch), []
        put = lambda a: jax.make_array_from_callback(
            a.shape, self.dp.batch_sharding, lambda i: a[i]
        )
        for r in range(rounds):
            idx = np.minimum(np.arange(r * batch, (r + 1) * batch), num - 1)  # fills the last
            keys = self._keys(key, idx.astype(np.uint32))
            eps = self._draw(keys) if noise is None else put(np.asarray(noise, np.float32)[idx])
            args = (eps, keys, table, put(which[idx]), uncond, z0, t, to, np.float32(scale))
            x = fn(self._unet_vars, self._vae_vars, *args)
            out.append(images.to_uint8(multihost_utils.process_allgather(x, tiled=True)))
            if progress is not None:
                progress(r + 1, rounds)
        return np.concatenate(out)[:num]

    def _batch(self, num: int) -> int:
        d = self.dp.num_devices
        return -(-min(self.settings.batch_size, num) // d) * d


__all__ = ["SD_SETTINGS", "SDPipeline", "dpm_solver_timesteps", "is_pipeline_folder", "step_grid"]
