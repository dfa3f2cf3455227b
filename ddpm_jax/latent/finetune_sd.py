"""Fine-tuning a Stable Diffusion UNet on a folder of captioned images with the training engine.

:func:`finetune` (``experiments.finetune_sd``) loads the pretrained pipeline
(``config.finetune.pretrained``), prepares the folder (``config.data``, every image captioned:
``metadata.jsonl`` or a ``.txt`` beside it) and trains the UNet alone with
:func:`ddpm_jax.train.train` (EMA, checkpoints, exact resume, preemption, bf16, ``shard_map`` /
``fsdp``, grids and evaluation), starting from the pretrained parameters:

- the VAE and the text encoder are frozen. Every image is encoded once into the VAE posterior's
  mean, scaled by the VAE's ``scaling_factor`` (the usual cached variant of diffusers'
  ``train_text_to_image``, which draws ``latent_dist.sample()`` each step; SD's posterior standard
  deviation is small against the latents' spread); every distinct caption and the empty prompt
  are encoded once by the text encoder. Both are cached in ``WORKDIR/sd_latents.npz`` (written
  atomically) under a key of the prepared folder and the pretrained model: a resume reads them,
  a changed folder or model encodes again;
- the UNet sees the captions as labels of a :class:`~ddpm_jax.models.sd_captions.CaptionUNet`,
  so the engine's label dropout (``train.p_uncond``) is caption dropout for classifier-free
  guidance, and its grids, ``samples.npz`` and evaluation cycle through
  ``finetune.grid_prompts``;
- ``WORKDIR/finetune_sd.json`` records the pretrained folder (its path and
  :func:`fingerprint`), the captions and shapes; a resume from another model is refused.

:func:`load_finetuned` gives the pretrained pipeline with the run's EMA UNet parameters in place
of the pretrained ones (``experiments.sample --workdir=RUN --prompt=...`` samples it with
:class:`~ddpm_jax.latent.stable_diffusion.SDPipeline`, any prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import builders, data, folder_scan, runs, train
from ddpm_jax.errors import UsageError
from ddpm_jax.models.autoencoder import AutoencoderKL, scale_latents, unscale_latents
from ddpm_jax.models.layers import DTYPES
from ddpm_jax.models.sd_captions import CaptionUNet
from ddpm_jax.run_start import prepare
from ddpm_jax.weights.stable_diffusion import COMPONENTS, MODEL_INDEX_NAME, StableDiffusion
from ddpm_jax.workdir import is_writer, log, read_json, save_npz, warn, write_json

RECORD = "finetune_sd.json"
CACHE = "sd_latents.npz"
_CACHE_VERSION = 1
_ENCODE_BATCH = 16
_SAMPLED = 1 << 20  # bytes hashed at each end of a weight file


def fingerprint(directory: str) -> str:
    """A SHA-256 of a pipeline folder's ``model_index.json`` and component files (names, sizes
    and the first and last MiB of each): the same model wherever it is copied; other weights
    of the same size and ends would pass (a full hash of gigabytes at every start would not)."""
    h = hashlib.sha256()
    files = [MODEL_INDEX_NAME]
    for component in COMPONENTS:
        for root, dirs, names in os.walk(os.path.join(directory, component)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(root, directory)
            files += [os.path.join(rel, n) for n in sorted(names) if not n.startswith(".")]
    for rel in files:
        path = os.path.join(directory, rel)
        size = os.path.getsize(path)
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(_SAMPLED))
            if size > 2 * _SAMPLED:
                f.seek(size - _SAMPLED)
                h.update(f.read())
    return h.hexdigest()[:16]


def load_pretrained(directory: str) -> StableDiffusion:
    """The pipeline of ``--pretrained`` (UsageError when it is not a Stable Diffusion folder)."""
    from ddpm_jax.latent.stable_diffusion import is_pipeline_folder
    from ddpm_jax.weights import load_stable_diffusion

    if not is_pipeline_folder(directory):
        raise UsageError(
            f"--pretrained={directory}: not a Stable Diffusion pipeline folder (a model_index.json "
            "naming unet, vae, text_encoder, tokenizer and scheduler)"
        )
    return load_stable_diffusion(directory)


def check_captions(directory: str) -> None:
    """Raises UsageError unless every image of ``directory`` has a caption."""
    listing = folder_scan.scan_folder(directory)
    captions = folder_scan.read_captions(listing)
    missing = [f for f, c in zip(listing.files, captions, strict=True) if c is None]
    if missing:
        raise UsageError(
            f"data.dir={listing.root!r}: {len(missing)} of {len(listing.files)} images have no "
            f"caption (first: {missing[0]}); fine-tuning needs a caption for every image "
            f'(metadata.jsonl lines {{"file_name", "text"}}, or a .txt file beside the image)'
        )


def check_record(workdir: str, pretrained: str, digest: str) -> None:
    """Refuses a run recorded with another pretrained model (fingerprint ``digest``)."""
    before = read_json(os.path.join(workdir, RECORD))
    if before is not None and before.get("fingerprint") != digest:
        raise UsageError(
            f"{workdir} fine-tunes {before.get('pretrained')} (fingerprint "
            f"{before.get('fingerprint')}); --pretrained={pretrained} is another model "
            f"({digest}): nothing was changed. Pass the same model, or use another --workdir"
        )
    if before is not None and before.get("pretrained") != pretrained:
        log(f"the pretrained model moved: {before.get('pretrained')} -> {pretrained}")


def encode_images(sd: StableDiffusion, images_uint8: np.ndarray) -> np.ndarray:
    """Scaled VAE posterior means of uint8 images ``[N, H, W, C]``: float32 ``[N, h, w, c]``."""
    vae = sd.vae

    @jax.jit
    def encode(x):
        mean, _ = vae.apply(sd.vae_variables, x, method=AutoencoderKL.encode)
        return scale_latents(mean, sd.scaling_factor, vae.shift_factor)

    n, out = len(images_uint8), []
    for i in range(0, n, _ENCODE_BATCH):
        chunk = images_uint8[i : i + _ENCODE_BATCH].astype(np.float32) / 127.5 - 1.0
        pad = _ENCODE_BATCH - len(chunk)  # one compiled shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        out.append(np.asarray(encode(chunk))[: _ENCODE_BATCH - pad])
    return np.concatenate(out)


def embed_prompts(sd: StableDiffusion, prompts: Sequence[str]) -> np.ndarray:
    """The text encoder's states of ``prompts``: float32 ``[P, 77, D]``."""
    embed = jax.jit(sd.text_encoder.apply)
    rows = [embed(sd.text_encoder_variables, sd.tokenizer.encode([p])) for p in prompts]
    return np.concatenate([np.asarray(r, np.float32) for r in rows])


def make_decode_fn(sd: StableDiffusion) -> Callable[[jax.Array], jax.Array]:
    """Scaled latents → images in [-1, 1] by the frozen VAE decoder (jittable)."""
    vae = sd.vae

    def decode(z):
        z = unscale_latents(z, sd.scaling_factor, vae.shift_factor)
        x = vae.apply(sd.vae_variables, z, method=AutoencoderKL.decode)
        return jnp.clip(x, -1.0, 1.0)

    return decode


def _latents(workdir: str, key: str, sd: StableDiffusion, prepared) -> dict[str, np.ndarray]:
    """The cache of ``workdir`` under ``key``, or the images and captions encoded now (and
    cached): ``latents [N, h, w, c]``, ``caption_ids [N]``, ``captions [U]`` (sorted, distinct)
    and ``contexts [U + 1, 77, D]`` (the captions', then the empty prompt's)."""
    path = os.path.join(workdir, CACHE)
    names = ("latents", "caption_ids", "captions", "contexts")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                cached = str(f["key"]) == key and {k: f[k] for k in names}
        except (OSError, ValueError, KeyError, EOFError) as e:  # damaged: encoded again
            warn(f"{path} cannot be read ({e}): encoding again")
            cached = None
        if cached:
            log(f"latents and caption states read from {path}")
            return cached
        if cached is False:
            warn(
                f"data.dir or the pretrained model changed since {path} was written: encoding again"
            )
    manifest = read_json(os.path.join(prepared.path, "manifest.json"))
    captions = manifest["captions"]
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    images = np.stack([prepared.source[i]["image"] for i in range(prepared.num_examples)])
    log(f"encoding {len(images)} images and {len(distinct)} distinct captions (frozen VAE, text)")
    out = dict(
        latents=encode_images(sd, images),
        caption_ids=np.asarray([index[c] for c in captions], np.int32),
        captions=np.asarray(distinct),
        contexts=embed_prompts(sd, [*distinct, ""]),
    )
    if is_writer():
        save_npz(path, key=np.asarray(key), **out)
    return out


def _grid_prompts(config: ml_collections.ConfigDict, captions: Sequence[str]) -> list[str]:
    given = list(config.finetune.grid_prompts)
    return given or list(captions[: max(1, config.sample.grid_size)])


def _check_fit(config: ml_collections.ConfigDict, sd: StableDiffusion, prepared) -> None:
    """The folder's images and the config against the pretrained model (one line each)."""
    if config.diffusion.prediction != sd.prediction:
        raise UsageError(
            f"config.diffusion.prediction={config.diffusion.prediction!r}: the pretrained model "
            f"predicts {sd.prediction!r} (its scheduler_config.json)"
        )
    if config.diffusion.num_timesteps != sd.schedule.num_timesteps:
        raise UsageError(
            f"config.diffusion.num_timesteps={config.diffusion.num_timesteps}: the pretrained "
            f"model has {sd.schedule.num_timesteps}"
        )
    if prepared.channels != sd.vae.in_channels:
        raise UsageError(
            f"data.channels: the images have {prepared.channels}, the VAE takes "
            f"{sd.vae.in_channels} (--config.data.channels={sd.vae.in_channels})"
        )
    factor = sd.vae.downsampling_factor * 2 ** (len(sd.unet.block_out_channels) - 1)
    if config.data.image_size % factor:
        raise UsageError(
            f"config.data.image_size={config.data.image_size}: the VAE and UNet need a multiple "
            f"of {factor}"
        )


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    start_over: bool = False,
    allow_change: Sequence[str] = (),
    step_callback: Callable[[int], None] | None = None,
) -> train.RunResult:
    """Fine-tunes ``config.finetune.pretrained``'s UNet on ``config.data.dir`` in ``workdir``
    (or resumes it): see the module docstring.

    Raises:
      UsageError: not a Stable Diffusion folder, a folder with uncaptioned images, another
        pretrained model than the run's, a config that does not fit the model.
    """
    options = dict(start_over=start_over, allow_change=allow_change)
    with prepare(config, workdir, **options) as start:
        workdir, pretrained = start.workdir, os.path.abspath(config.finetune.pretrained)
        sd = load_pretrained(pretrained)
        digest = fingerprint(pretrained)
        check_record(workdir, pretrained, digest)
        check_captions(config.data.dir)
        prepared = builders.prepare_folder(config)
        _check_fit(config, sd, prepared)
        key = json.dumps([_CACHE_VERSION, prepared.path, digest])
        cached = _latents(workdir, key, sd, prepared)
        captions = [str(c) for c in cached["captions"]]
        grid = _grid_prompts(config, captions)
        # The table: the grid prompts, the empty prompt (null_label = G), the captions.
        ctx = cached["contexts"]
        contexts = np.concatenate([embed_prompts(sd, grid), ctx[-1:], ctx[:-1]])
        unet = sd.unet.clone(dtype=DTYPES[config.model.dtype], kernels=config.model.kernels)
        model = CaptionUNet(unet, contexts, null_label=len(grid))
        latents = cached["latents"]
        if is_writer():
            info = dict(
                pretrained=pretrained,
                fingerprint=digest,
                num_images=len(latents),
                num_captions=len(captions),
                grid_prompts=grid,
                image_shape=[config.data.image_size, config.data.image_size, prepared.channels],
                latent_shape=list(latents.shape[1:]),
            )
            if read_json(os.path.join(workdir, RECORD)) != info:
                write_json(os.path.join(workdir, RECORD), info)
        log(
            f"fine-tuning {pretrained}: {len(latents)} images, {len(captions)} distinct captions, "
            f"latents {latents.shape[1:]}; VAE and text encoder frozen"
        )
        dataset = data.array_dataset(
            latents,
            cached["caption_ids"] + len(grid) + 1,
            num_classes=len(contexts),
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            name="sd_latents",
        )
        return train.train(
            config, start, dataset, model,
            decode_fn=make_decode_fn(sd),
            label_classes=np.full(len(contexts), -1, np.int32),  # no class accuracy
            step_callback=step_callback,
            init_params=sd.unet_variables,
        )  # fmt: skip


def is_finetuned_run(workdir: str) -> bool:
    """Whether ``workdir`` is a fine-tuning run (it has ``finetune_sd.json``)."""
    return os.path.isfile(os.path.join(workdir, RECORD))


def load_finetuned(workdir: str) -> tuple[StableDiffusion, int]:
    """The run's pretrained pipeline with the EMA UNet parameters of its newest checkpoint in
    place of the pretrained ones, and the checkpoint's step.

    Raises:
      UsageError: no readable record or config, the pretrained folder is gone or changed, no
        complete checkpoint.
    """
    path = os.path.abspath(workdir)
    record = read_json(os.path.join(path, RECORD))
    saved = read_json(os.path.join(path, "config.json"))
    if record is None or saved is None:
        raise UsageError(f"workdir={path!r}: no readable {RECORD} and config.json")
    pretrained = record["pretrained"]
    if not os.path.isdir(pretrained) or fingerprint(pretrained) != record["fingerprint"]:
        raise UsageError(
            f"workdir={path!r} fine-tunes {pretrained} (fingerprint {record['fingerprint']}), "
            "which is gone or changed: the run samples with that model's VAE and text encoder"
        )
    sd = load_pretrained(pretrained)
    config = ml_collections.ConfigDict(saved)
    dummy = np.zeros((1, 1, sd.unet.context_dim), np.float32)  # the table holds no parameter
    model = CaptionUNet(sd.unet, dummy, null_label=0)
    _, ema, step = runs.restore_ema(path, config, model, tuple(record["latent_shape"]))
    return sd._replace(unet_variables=ema), step


__all__ = [
    "CACHE",
    "RECORD",
    "check_captions",
    "encode_images",
    "finetune",
    "fingerprint",
    "is_finetuned_run",
    "load_finetuned",
    "make_decode_fn",
]
