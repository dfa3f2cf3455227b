"""Sample from a trained run or from published weights, without evaluating.

    python -m experiments.sample --workdir=runs/digits --num_samples=100 --labels=3,7
    python -m experiments.sample --workdir=runs/ldm --prompt="a handwritten seven"
    python -m experiments.sample --pretrained=ddpm-cifar10-32 --method=ddpm --num_steps=1000
    python -m experiments.sample --pretrained=stable-diffusion-v1-5 --prompt="a red fox" \
        --negative_prompt="blurry" --method=dpmpp_2m --num_steps=25 --num_samples=4

``--workdir RUN`` samples the EMA parameters of a training run's newest checkpoint (pixel or
latent); ``--pretrained DIR`` a diffusers DDPM folder (``ddpm_jax.weights.load_diffusers_pipeline``:
the flat ``google/ddpm-*`` layout or a ``model_index.json`` pipeline). The sampling flags, one per
field of ``ddpm_jax.sample_settings.SampleSettings`` (``--method``, ``--num_steps``, ``--eta``,
``--guidance_scale``, ``--batch_size``, ...), default to the run's ``sample.*`` config (DDIM, 50
steps for published weights). A class-conditional model cycles through ``--labels`` (default:
every class); a latent run samples ``--prompt`` (any text) or cycles through its prompts.

Samples are drawn in rounds sharded over every device, with a progress line. Sample ``i`` uses
the key ``fold_in(fold_in(key(seed), FINAL_TAG), i)`` alone: with a run's own settings and seed
this reproduces its ``samples.npz``, on any number of devices (a latent run's too, with
``--num_samples`` = its prompts times ``latent.samples_per_prompt``). Writes ``OUT/samples.npz``
(``images`` uint8 [N, H, W, C], ``labels`` int32 [N], the class each sample shows or -1) and
``OUT/samples.png`` (a folder run's class names above the tiles; default ``OUT``:
``RUN/sampled/<method>_<steps>_g<scale>_seed<seed>``, or ``./sampled/<DIR name>/...``). A
user's mistake is one line on stderr with exit code 2.

A Stable Diffusion pipeline folder (``model_index.json`` with a text encoder), or the ``--workdir``
of an ``experiments.finetune_sd`` run (its pretrained pipeline with the run's EMA UNet, any
prompt), samples ``--prompt`` with ``--negative_prompt``, ``--guidance_scale`` (default 7.5),
``--method=ddim|dpmpp_2m`` on diffusers' grids, ``--height`` / ``--width``, and image-to-image
with ``--image=INIT.png --strength=0.6`` (``ddpm_jax.latent.stable_diffusion.SDPipeline``).
``--noise=FILE.npy`` (float32 NHWC ``[num_samples, ...]``, latents for a latent model) replaces
the seed's x_T (for image-to-image: the noise added to the encoded image), to compare with other
implementations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from ddpm_jax import cli
from ddpm_jax.errors import UsageError


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    f = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "A training run's work directory.", **f)
    flags.DEFINE_string("pretrained", None, "A diffusers DDPM folder.", **f)
    flags.DEFINE_integer("num_samples", 64, "Samples to draw.", **f)
    cli.define_sample_flags(fv)  # --method, --num_steps, --eta, --guidance_scale, ...
    flags.DEFINE_list("labels", None, "Class labels to cycle through (class-conditional).", **f)
    flags.DEFINE_string("prompt", None, "A text prompt (latent runs).", **f)
    flags.DEFINE_integer("seed", None, "Sampling seed (default: the run's seed, or 0).", **f)
    flags.DEFINE_string("out", None, "Output directory.", **f)
    flags.DEFINE_string("noise", None, "x_T as a float32 NHWC .npy, [num_samples, ...].", **f)
    # Stable Diffusion pipelines only.
    flags.DEFINE_string("negative_prompt", "", "The prompt guidance steers away from.", **f)
    flags.DEFINE_string("image", None, "Image-to-image: the initial image file.", **f)
    flags.DEFINE_float("strength", 0.8, "Image-to-image: the fraction of steps run.", **f)
    flags.DEFINE_integer("height", None, "Image height (default: the UNet's size).", **f)
    flags.DEFINE_integer("width", None, "Image width (default: the UNet's size).", **f)
    return fv


def main(argv: Sequence[str] | None = None) -> str:
    """Parses flags, samples and writes ``samples.npz`` and ``samples.png``; returns ``OUT``."""
    return cli.tool_main(__doc__, _define_flags, _main, argv)


def _conditioning(run, fv) -> dict:
    """The ``labels`` / ``tokens`` of the generator call for ``--labels`` / ``--prompt``."""
    n, null = fv.num_samples, run.model.null_label
    if fv.prompt is not None:
        if run.tokenizer is None:
            raise UsageError("--prompt needs a latent run with text prompts (use --labels)")
        tokens, mask = run.tokenizer.encode([fv.prompt])
        if not mask.any():
            raise UsageError(f"--prompt={fv.prompt!r} has no word: it is the empty prompt")
        return dict(tokens=np.repeat(tokens, n, axis=0))
    if fv.labels is None:
        return {}
    if null is None:
        raise UsageError("--labels needs a class-conditional model; this one is unconditional")
    try:
        labels = [int(v) for v in fv.labels]
    except ValueError:
        raise UsageError(f"--labels={','.join(fv.labels)}: expected integers") from None
    if not labels or min(labels) < 0 or max(labels) > null:
        raise UsageError(f"--labels must lie in [0, {null}] ({null}: the unconditional model)")
    return dict(labels=np.resize(np.asarray(labels, np.int32), n))


def _main(fv: flags.FlagValues) -> str:
    if fv.num_samples < 1:
        raise UsageError(f"--num_samples={fv.num_samples} must be >= 1")

    import jax

    from ddpm_jax import grid_names, images
    from ddpm_jax.generate import ProgressLine
    from ddpm_jax.latent.finetune_sd import is_finetuned_run
    from ddpm_jax.latent.stable_diffusion import is_pipeline_folder
    from ddpm_jax.runs import load
    from ddpm_jax.workdir import FINAL_TAG, is_writer, log, run_key, save_npz

    if fv.pretrained is not None and fv.workdir is None and is_pipeline_folder(fv.pretrained):
        return _stable_diffusion(fv)
    if fv.workdir is not None and fv.pretrained is None and is_finetuned_run(fv.workdir):
        return _stable_diffusion(fv, finetuned=True)
    sd_only = [n for n in ("image", "height", "width") if fv[n].value is not None]
    if sd_only or fv.negative_prompt:
        raise UsageError(f"--{(sd_only or ['negative_prompt'])[0]} is for Stable Diffusion only")
    run = load(fv.workdir, fv.pretrained)
    T, methods = run.schedule.num_timesteps, run.formulation.methods
    settings = cli.sample_settings(fv, run.sample_settings, T, methods)
    generator = run.generator(settings)
    cond = _conditioning(run, fv)
    seed = fv.seed if fv.seed is not None else (run.config.seed if run.config else 0)
    base = run.path if fv.workdir else os.path.join("sampled", os.path.basename(run.path))
    out = os.path.abspath(fv.out or os.path.join(base, "sampled", f"{settings.name()}_seed{seed}"))
    label = f"sampling {fv.num_samples} images ({settings.method}, {settings.num_steps} steps)"
    progress = ProgressLine(label, fv.num_samples)
    key = run_key(seed, FINAL_TAG)
    noise = _noise(fv, run.image_shape)
    imgs, labels = generator(
        run.ema_params, key, fv.num_samples, progress=progress, x_T=noise, **cond
    )
    if is_writer():  # labels: the class each sample shows (a latent run's prompts name one)
        classes, names = run.classes_of(labels), grid_names.label_names(run.path)  # folder runs
        save_npz(os.path.join(out, "samples.npz"), images=imgs, labels=classes)
        cols = int(np.ceil(np.sqrt(len(imgs))))
        grid = grid_names.labelled_grid(imgs, cols, classes, names)
        images.save_png(os.path.join(out, "samples.png"), grid)
        log(f"wrote {out}/samples.npz and samples.png ({jax.device_count()} devices)")
    return out


def _noise(fv: flags.FlagValues, shape) -> np.ndarray | None:
    """``--noise``: float32 [num_samples, *shape] from a .npy file, or None."""
    if fv.noise is None:
        return None
    try:
        noise = np.load(fv.noise, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--noise={fv.noise}: cannot read a .npy array ({e})") from None
    expected = (fv.num_samples, *shape)
    if noise.shape != expected or not np.issubdtype(noise.dtype, np.floating):
        raise UsageError(
            f"--noise={fv.noise}: {noise.dtype} {noise.shape}, expected float32 {expected} "
            "(--num_samples, then the model's NHWC input: latents for a latent model)"
        )
    return noise.astype(np.float32)


def _stable_diffusion(fv: flags.FlagValues, finetuned: bool = False) -> str:
    """``--pretrained`` names a Stable Diffusion pipeline folder, or ``--workdir`` a fine-tuning
    run (``finetuned``: its pretrained pipeline with the run's EMA UNet): ``SDPipeline``."""
    import jax

    from ddpm_jax import images
    from ddpm_jax.generate import ProgressLine
    from ddpm_jax.latent import stable_diffusion as sdp
    from ddpm_jax.weights import load_stable_diffusion
    from ddpm_jax.workdir import FINAL_TAG, is_writer, log, run_key, save_npz

    if fv.prompt is None or fv.labels is not None:
        raise UsageError("a Stable Diffusion pipeline needs --prompt (and takes no --labels)")
    if finetuned:
        from ddpm_jax.latent.finetune_sd import load_finetuned

        sd, step = load_finetuned(fv.workdir)
        log(f"{fv.workdir}: the EMA UNet of step {step} in its pretrained pipeline")
    else:
        sd = load_stable_diffusion(fv.pretrained)
    settings = cli.sample_settings(fv, sdp.SD_SETTINGS, sd.schedule.num_timesteps)
    image = None if fv.image is None else sdp.load_image(fv.image)
    height, width = (fv.height, fv.width) if image is None else image.shape[:2]
    if image is not None and (fv.height or height, fv.width or width) != (height, width):
        raise UsageError(f"--height/--width differ from --image's size {height}x{width}")
    pipe = sdp.SDPipeline(sd, settings, height=height, width=width)
    noise = _noise(fv, pipe.latent_shape)
    seed = fv.seed or 0
    if finetuned:
        default = os.path.join(fv.workdir, "sampled", f"{settings.name()}_seed{seed}")
    else:
        name = os.path.basename(os.path.abspath(fv.pretrained))
        default = os.path.join("sampled", name, "sampled", f"{settings.name()}_seed{seed}")
    out = os.path.abspath(fv.out or default)
    label = f"sampling {fv.num_samples} images ({settings.method}, {settings.num_steps} steps)"
    imgs = pipe(
        run_key(seed, FINAL_TAG),
        fv.num_samples,
        prompt=fv.prompt,
        negative_prompt=fv.negative_prompt,
        image=image,
        strength=fv.strength,
        noise=noise,
        progress=ProgressLine(label, fv.num_samples),
    )
    if is_writer():
        labels = np.full(len(imgs), -1, np.int32)
        save_npz(os.path.join(out, "samples.npz"), images=imgs, labels=labels)
        cols = int(np.ceil(np.sqrt(len(imgs))))
        images.save_png_grid(os.path.join(out, "samples.png"), imgs, cols)
        log(f"wrote {out}/samples.npz and samples.png ({jax.device_count()} devices)")
    return out


if __name__ == "__main__":
    main()
