"""ddpm_jax: denoising diffusion models in JAX and Flax.

The pure math (``schedules``, ``diffusion``, ``losses``, ``samplers``, ``guidance``) depends only
on jax, numpy and chex and composes with any ``model_fn(x_t, t, **cond) -> prediction``.
"""

__version__ = "0.1.0"
