"""Offline latent diffusion with text prompts on digits (CPU, minutes).

Digits upsampled to 32x32 → a KL autoencoder to 8x8x4 latents (trained first, then frozen; latents
scaled by 1 / std) → a text-conditioned latent diffusion model (UNet with cross-attention to a
jointly trained TextEncoder) on prompts such as "a handwritten seven" and "the digit 7", prompts
dropped with probability ``train.p_uncond`` → samples with classifier-free guidance against the
empty prompt → decoded.

Writes into ``--workdir`` (besides the run loop's checkpoints and metrics):

- ``vae.msgpack`` (the frozen autoencoder; reused on resume) and ``latent.json`` (scale factor,
  prompts);
- ``prompts/<prompt>.png``: a grid of samples for every training prompt and for the held-out
  phrasings of ``HELDOUT_TEMPLATES`` (new combinations of known words);
- ``samples.npz``: ``images`` uint8 [N, 32, 32, 1] (decoded samples of the training prompts,
  sample ``i`` of prompt ``i % P``) and ``labels`` int32 [N], the class each sample's prompt
  names: what ``python -m experiments.sample --workdir=DIR --num_samples=N`` draws again, bit for
  bit, on any number of devices;
- ``latent_metrics.json``: the autoencoder's reconstruction error on the held-out digits and the
  fraction of samples a digits classifier (on 8x8 downsampled samples) assigns to the class their
  prompt names.

Usage: ``python -m experiments.latent_digits --workdir=/tmp/latent_digits [--config.x.y=v]``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import cli, config as config_lib, data, images, runs
from ddpm_jax.evaluation.digits_classifier import train_digits_classifier
from ddpm_jax.latent import frozen_vae, pipeline, prompts
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.preemption import PreemptionGuard
from ddpm_jax.workdir import is_writer, read_json, write_json

NAMES = tuple((name,) for name in ("zero one two three four five six seven eight nine".split()))
TEMPLATES = ("a handwritten {name}", "the digit {name}", "the digit {index}", "the number {name}")
HELDOUT_TEMPLATES = ("the number {index}", "a handwritten {index}")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.default_config()
    c.data.name = "digits"  # the dataset the latents are built from (and evaluated against)
    c.latent = config_lib.latent_config()

    c.latent.text_width = 32
    c.latent.text_depth = 1
    c.latent.text_num_heads = 2

    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.0
    c.model.num_heads = 2
    c.model.num_groups = 8
    c.model.class_conditional = True  # on the prompt id (see ddpm_jax.models.text.PromptUNet)

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    # v, not eps: the cosine schedule ends at alpha_bar = 2.4e-9 and DPM-Solver++'s log-SNR grid
    # starts there, where x0 = (x - sigma eps) / alpha multiplies any eps error by up to 2e4 (no
    # clip_x0 in latent space to catch it): eps-trained samples blew up to latent std ~1e3 and
    # 62.5% prompt accuracy. With v, x0 = alpha x - sigma v stays bounded at every noise level.
    c.diffusion.prediction = "v"

    c.train.num_steps = 2000
    c.train.batch_size = 64
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.995  # a short run: the EMA must forget the initialisation
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.sample_every = 0  # per-prompt grids are written at the end instead
    c.train.p_uncond = 0.15
    c.train.steps_per_call = 10

    c.sample.num_samples = 0  # samples.npz is written per prompt by this experiment
    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 30
    c.sample.guidance_scale = 3.0
    c.sample.clip_x0 = None  # latents are not bounded
    c.sample.grid_size = 0
    c.sample.batch_size = 500
    return c


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    start_over: bool = False,
    allow_change: tuple[str, ...] = (),
) -> dict | None:
    """Trains (or resumes), then samples the run as ``experiments.sample`` would and writes the
    per-prompt grids, ``samples.npz`` and metrics.

    SIGTERM in any phase (autoencoder, diffusion, sampling) stops it with nothing final written
    (the training state is saved); the same command then resumes. A finished run (its metrics
    written) only reports it. Returns the metrics, or None.
    """
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    train_prompts, prompt_class = prompts.class_prompts(TEMPLATES, NAMES)
    heldout, heldout_class = prompts.class_prompts(HELDOUT_TEMPLATES, NAMES)
    metrics_path = os.path.join(workdir, "latent_metrics.json")
    images_, labels = data.digits_arrays("train")
    with PreemptionGuard() as preemption:
        result = pipeline.train_latent(
            config, workdir, images_, labels, train_prompts, prompt_class, log=log,
            preemption=preemption, start_over=start_over, allow_change=allow_change,
        )  # fmt: skip
        if result is None:
            return None
        if result.status == "already_complete" and os.path.exists(metrics_path):
            log(f"already finished: samples and metrics in {workdir}")  # written last
            with open(metrics_path) as f:
                return json.load(f)
        t_train = time.time() - t0
        loaded = runs.load_run(workdir)
        n, stop = config.latent.samples_per_prompt, preemption.reached
        samples = prompts.sample_prompts(loaded, heldout, n, config.seed, should_stop=stop)
        if samples is None:
            log("preempted (SIGTERM) while sampling: nothing written; run the same command again")
            return None
    all_prompts = train_prompts + heldout
    prompts.write_prompt_outputs(workdir, all_prompts, samples)
    t_sample = time.time() - t0 - t_train
    log(f"wrote {len(all_prompts)} prompt grids and samples.npz ({len(train_prompts)} prompts)")
    classes = np.concatenate([prompt_class, heldout_class])
    metrics = evaluate(config, loaded, samples.by_prompt, classes)
    metrics.update(
        prompts=all_prompts, train_s=t_train, sample_s=t_sample, total_s=time.time() - t0
    )
    metrics["per_prompt_accuracy"] = dict(zip(all_prompts, metrics.pop("per_prompt"), strict=True))
    if is_writer():
        write_json(metrics_path, metrics)
    log(
        f"held-out VAE MAE {metrics['vae_heldout_mae_01']:.4f} (images in [0, 1]); class accuracy "
        f"with guidance {config.sample.guidance_scale}: "
        f"{metrics['class_accuracy_train_prompts']:.3f} (training prompts), "
        f"{metrics['class_accuracy_heldout_phrasings']:.3f} (held-out phrasings)"
    )
    return metrics


def evaluate(config, loaded: runs.LoadedRun, samples: np.ndarray, classes: np.ndarray) -> dict:
    """The autoencoder's held-out error and the class accuracy of the samples of each prompt.

    Args:
      config: the run's config.
      loaded: the trained run (``runs.load_run``).
      samples: uint8 ``[P', n, H, W, C]``, the samples of the training prompts then of the
        held-out phrasings.
      classes: ``[P']`` the class each prompt names.
    """
    size, num_train = config.latent.image_size, loaded.model.num_prompts
    # Held-out reconstruction error of the frozen autoencoder (images in [0, 1]).
    test_images, test_labels = data.digits_arrays("test")
    x = images.resize(test_images, (size, size)).astype(np.float32) / 127.5 - 1.0
    vae, vae_params = frozen_vae.load_vae(config, loaded.path, loaded.output_shape)
    encode = lambda v: vae.apply(vae_params, v, method=AutoencoderKL.encode)[0]
    recon = jax.jit(lambda v: vae.apply(vae_params, encode(v), method=AutoencoderKL.decode))(x)
    mae = float(jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - x))) / 2.0
    # Class accuracy judged by a digits classifier on 8x8 downsampled samples.
    classifier = train_digits_classifier(config.seed)
    n = samples.shape[1]
    small = images.resize(samples.reshape(-1, size, size, samples.shape[-1]), (8, 8))
    correct = classifier.predict(small).reshape(len(classes), n) == classes[:, None]
    info = read_json(os.path.join(loaded.path, pipeline.LATENT_FILE))
    return {
        "vae_heldout_mae_01": mae,
        "scale_factor": info["scale_factor"],
        "train_steps": loaded.step,
        "guidance_scale": float(loaded.sample_settings.guidance_scale),
        "samples_per_prompt": n,
        "class_accuracy_train_prompts": float(correct[:num_train].mean()),
        "class_accuracy_heldout_phrasings": float(correct[num_train:].mean()),
        "per_prompt": [float(a) for a in correct.mean(1)],
        "classifier_accuracy_on_real_test": float(classifier.accuracy(test_images, test_labels)),
    }


def main(argv=None) -> dict | None:
    return cli.main(get_config, sys.argv if argv is None else argv, run_fn=run)


if __name__ == "__main__":
    main()
