"""The benchmark's PyTorch baseline section: ``experiments/torch_baseline.py`` (diffusers'
``UNet2DModel``, the same step in PyTorch eager, ``DDIMPipeline``; float32) in a subprocess with
this process's thread count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from ddpm_jax.errors import UsageError
from experiments import cifar
from experiments.measure import num_threads

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_torch(args) -> list[dict]:
    """Runs ``experiments.torch_baseline`` in a subprocess with this process's thread count."""
    if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
        print("torch / diffusers not installed: skipping the PyTorch baseline", flush=True)
        return []
    if args.model not in ("cifar10", "tiny"):
        raise UsageError(f"--model={args.model}: the PyTorch baseline has cifar10 and tiny only")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [
            sys.executable, "-m", "experiments.torch_baseline", "--model", args.model,
            "--threads", str(num_threads()), "--batch", str(args.batch),
            "--sample-batch", str(args.sample_batch), "--num-steps", str(args.num_steps),
            "--warmup", str(args.train_warmup), "--repeats", str(args.train_repeats),
            "--sample-repeats", str(args.repeats),
            "--dropout", str(cifar.get_config().model.dropout), "--json", out,
        ]  # fmt: skip
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            result = json.load(f)
    common = dict(framework=f"torch {result['torch_version']}", threads=result["threads"],
                  peak_rss_mb=result.get("peak_rss_mb"))  # fmt: skip
    train, sample = result["train"], result["sample"]
    return [
        dict(common, what="train", batch=train["batch"], time_s=train["step_s"],
             images_per_s=train["images_per_s"]),
        dict(common, what=f"sample ddim-{sample['num_steps']}", batch=sample["batch"],
             time_s=sample["time_s"], images_per_s=sample["images_per_s"]),
    ]  # fmt: skip
