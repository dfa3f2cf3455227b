"""The PyTorch side of ``experiments/benchmark.py``: the same CIFAR-10 DDPM model, trained and
sampled with PyTorch eager and diffusers on the same CPU threads.

- Model: diffusers' ``UNet2DModel`` in the configuration of ``google/ddpm-cifar10-32`` (Ho et al.
  2020, 35,746,307 parameters; ``freq_shift=1``, ``flip_sin_to_cos=False``,
  ``downsample_padding=0``, ``norm_eps=1e-6``), numerically the same network as
  ``ddpm_jax.models.unet.cifar10_ddpm`` (tests/test_unet.py checks the equivalence).
- Training step: the same computation as ``ddpm_jax.state.make_train_step`` -- per-example
  ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, mean
  squared error to ``eps``, ``clip_grad_norm_(1.0)``, ``torch.optim.Adam`` (lr 2e-4 with linear
  warm-up, betas (0.9, 0.999), eps 1e-8) and an EMA of the parameters (decay 0.9999), with
  PyTorch's default settings (eager mode, default Adam implementation).
- Sampling: diffusers' ``DDIMPipeline`` (``DDIMScheduler``, linear betas 1e-4..0.02, eta 0) for
  ``--num-steps`` steps, ``output_type="np"``.

Run as ``python -m experiments.torch_baseline --threads 2 --batch 16 --json out.json``; the
benchmark does so in a subprocess so that neither framework's thread pool competes with the
other's. Needs the ``torch`` extra (``pip install -e .[torch]``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

# diffusers' UNet2DModel configuration of google/ddpm-cifar10-32 (Ho et al. 2020).
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    act_fn="silu",
)
NUM_PARAMS = 35_746_307
# The benchmark's "tiny" smoke-test model (benchmark.MODELS["tiny"]): one level, 8x8 images.
TINY_CONFIG = dict(
    DDPM_CIFAR10_CONFIG,
    sample_size=8,
    block_out_channels=(8,),
    layers_per_block=1,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    norm_num_groups=4,
)
CONFIGS = {"cifar10": DDPM_CIFAR10_CONFIG, "tiny": TINY_CONFIG}
NUM_TIMESTEPS = 1000


def make_unet(model: str = "cifar10", dropout: float = 0.0):
    """diffusers' ``UNet2DModel`` with the DDPM CIFAR-10 (or tiny) configuration, random weights.

    Raises:
      RuntimeError: if the CIFAR-10 model does not have 35,746,307 parameters (a different
        diffusers layout).
    """
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS[model], dropout=dropout)
    n = sum(p.numel() for p in unet.parameters())
    if model == "cifar10" and n != NUM_PARAMS:
        raise RuntimeError(f"diffusers UNet2DModel has {n} parameters, expected {NUM_PARAMS}")
    return unet


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``: unlike ``ru_maxrss`` it does not
    carry over a parent's peak across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def linear_alpha_bars(num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """``alpha_bar_t`` of Ho et al.'s linear schedule (betas 1e-4..0.02), float32 ``[T]``."""
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


class Trainer:
    """One DDPM training step in PyTorch eager (see the module docstring).

    Args:
      model: the ``UNet2DModel`` (trained in place).
      lr / warmup_steps / grad_clip / ema_decay: as ``ddpm_jax.state.make_optimizer`` and
        ``make_train_step``.
    """

    def __init__(self, model, lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999):
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        )
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.params = [p for p in model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.alpha_bars = linear_alpha_bars()
        self.gen = torch.Generator().manual_seed(0)

    def step(self, x0: torch.Tensor) -> float:
        """One update on ``x0: [B, 3, 32, 32]`` in [-1, 1]; returns the loss."""
        b = x0.shape[0]
        t = torch.randint(0, len(self.alpha_bars), (b,), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        ab = self.alpha_bars[t].view(b, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
        return loss.item()


def _timed(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of ``repeats`` calls after ``warmup``)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def bench_train(model: str, batch: int, warmup: int, repeats: int, dropout: float) -> dict:
    """Training throughput: median over ``repeats`` steps after ``warmup`` steps."""
    unet = make_unet(model, dropout)
    trainer = Trainer(unet)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((batch, 3, size, size), generator=gen) * 2 - 1
    first, times = _timed(lambda: trainer.step(x0), warmup, repeats)
    med = statistics.median(times)
    return dict(
        batch=batch,
        first_step_s=first,
        step_s=med,
        step_s_min=min(times),
        images_per_s=batch / med,
        num_params=sum(p.numel() for p in unet.parameters()),
    )


def bench_sample(model: str, batch: int, num_steps: int, repeats: int) -> dict:
    """``DDIMPipeline`` throughput (eta 0, ``num_steps`` steps): median of ``repeats`` calls
    after one untimed 2-step call (which creates oneDNN's primitives)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=NUM_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )
    pipe = DDIMPipeline(unet=make_unet(model).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)

    def run(steps=num_steps):
        return pipe(batch_size=batch, generator=gen, num_inference_steps=steps, eta=0.0,
                    output_type="np")  # fmt: skip

    start = time.perf_counter()
    run(2)
    first = time.perf_counter() - start
    _, times = _timed(run, 0, repeats)
    med = statistics.median(times)
    return dict(
        method="ddim",
        batch=batch,
        num_steps=num_steps,
        first_call_2_steps_s=first,
        time_s=med,
        images_per_s=batch / med,
        ms_per_call=1e3 * med / num_steps,
    )


def run(
    model: str,
    threads: int,
    batch: int,
    sample_batch: int,
    num_steps: int,
    warmup: int,
    repeats: int,
    sample_repeats: int,
    dropout: float,
    sections: Sequence[str] = ("train", "sample"),
) -> dict:
    """Runs the requested sections with ``torch.set_num_threads(threads)``; returns a dict."""
    torch.set_num_threads(threads)
    out = dict(
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
    )
    if "train" in sections:
        out["train"] = bench_train(model, batch, warmup, repeats, dropout)
    if "sample" in sections:
        out["sample"] = bench_sample(model, sample_batch, num_steps, sample_repeats)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(CONFIGS), default="cifar10")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-repeats", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--sections", default="train,sample")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    result = run(
        a.model,
        a.threads,
        a.batch,
        a.sample_batch,
        a.num_steps,
        a.warmup,
        a.repeats,
        a.sample_repeats,
        a.dropout,
        tuple(a.sections.split(",")),
    )
    text = json.dumps(result, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
