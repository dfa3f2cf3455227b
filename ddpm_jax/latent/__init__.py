"""Latent diffusion (Rombach et al. 2022), composed from the library's pieces.

- :mod:`~ddpm_jax.latent.vae_train`: training the KL autoencoder (reconstruction + KL loss);
- :mod:`~ddpm_jax.latent.frozen_vae`: the run's frozen autoencoder (``vae.msgpack``), encoding
  images into scaled latents and decoding samples;
- :mod:`~ddpm_jax.latent.prompts`: prompts of classes, a loaded run's samples of its prompts and
  of any other prompt (``runs.load_run`` + ``Generator``), per-prompt outputs;
- :mod:`~ddpm_jax.latent.pipeline`: the run: frozen autoencoder → latents → the ordinary training
  loop on a prompt-conditioned UNet (``ddpm_jax.models.text.PromptUNet``).
- :mod:`~ddpm_jax.latent.captions`: a captioned image folder's captions as the prompts of a run;
- :mod:`~ddpm_jax.latent.stable_diffusion`: text-to-image and image-to-image of a published Stable
  Diffusion pipeline (``ddpm_jax.weights.load_stable_diffusion``) on diffusers' step grids.
- :mod:`~ddpm_jax.latent.finetune_sd`: a Stable Diffusion UNet fine-tuned by the ordinary training
  loop on a captioned image folder (frozen VAE and text encoder, latents and caption states
  cached), and the pipeline with a run's EMA UNet for sampling.
"""
