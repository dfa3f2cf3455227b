"""bfloat16 training end to end: ``--config.model.dtype=bfloat16`` on the digits recipe.

The model computes in bfloat16 while its parameters, their gradients, the Adam moments and the
EMA stay float32 (known answer: the dtypes of every leaf of the checkpointed state, and of the
gradients the optimizer receives, recorded at trace time). The per-step losses of a bfloat16
run follow the float32 run of the same seed (tolerance below), and, in the slow test, the
bfloat16 model's guided samples are recognised by the digits classifier.

Runs go through ``cli.main(digits.get_config, argv)`` in-process (8 simulated CPU devices, see
conftest.py), with the flags a user would pass.
"""

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from ddpm_jax import builders, cli
from ddpm_jax.evaluation.digits_classifier import train_digits_classifier
from experiments import digits

NUM_STEPS = 10  # one compiled call of the recipe's 10 steps per call
# bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 (relative), and the
# network's prediction p is off by r ~ 1e-2 (a sum over its ops; ~1.3e-2 measured on a tiny
# UNet in tests/test_unet.py). The loss mean ||eps - p||^2 then moves by at most
# 2 r ||p|| / ||eps - p|| (relative): 0 at initialisation (p = 0, zero-initialised conv_out) and
# small while ||p|| << ||eps|| in the first steps, plus what the parameters drift apart through
# the updates. Measured over the first 10 steps: at most 1.4e-3 (step 10). 1e-2 leaves 7x margin
# and is still far below the 8% by which the loss falls over these steps (a bfloat16 run whose
# updates were lost would stand still).
LOSS_RTOL = 1e-2


def _argv(workdir, *flags):
    return [
        "digits.py",
        f"--workdir={workdir}",
        "--config.train.log_every=1",
        "--config.train.sample_every=0",
        "--config.eval.every=0",
        *flags,
    ]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def _checkpoint(workdir, step):
    """The checkpointed TrainState as NumPy arrays of their stored dtypes."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _recording_optimizer(received):
    """builders.build_optimizer, with the dtypes of the gradients that reach it recorded."""
    build = builders.build_optimizer

    def record(updates, state, params=None):
        received.update(str(g.dtype) for g in jax.tree.leaves(updates))  # at trace time
        return updates, state

    def build_optimizer(config):
        optimizer, lr_schedule = build(config)
        recorder = optax.GradientTransformation(lambda params: optax.EmptyState(), record)
        return optax.chain(recorder, optimizer), lr_schedule

    return build_optimizer


@pytest.mark.slow
def test_bfloat16_trains_with_float32_state_and_follows_float32(tmp_path, monkeypatch):
    steps = f"--config.train.num_steps={NUM_STEPS}"
    flags = (steps, f"--config.train.checkpoint_every={NUM_STEPS}", "--config.sample.num_samples=0")
    received = set()
    monkeypatch.setattr(builders, "build_optimizer", _recording_optimizer(received))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        workdir = tmp_path / dtype
        result = cli.main(
            digits.get_config, _argv(workdir, *flags, f"--config.model.dtype={dtype}")
        )
        assert (result.status, result.step) == ("completed", NUM_STEPS)
        runs[dtype] = workdir
    assert received == {"float32"}  # gradients arrive float32 at the optimizer

    state = _checkpoint(runs["bfloat16"], NUM_STEPS)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    floats = {jax.tree_util.keystr(p): str(a.dtype) for p, a in leaves if a.dtype.kind == "f"}
    assert set(floats.values()) == {"float32"}, floats
    for part in ("params", "ema_params", "opt_state"):  # Adam's mu and nu are in opt_state
        assert sum(k.startswith(f"['{part}']") for k in floats) >= 10, part
    assert len(floats) == 4 * sum(k.startswith("['params']") for k in floats)  # p, ema, mu, nu

    f32, bf16 = _losses(runs["float32"]), _losses(runs["bfloat16"])
    assert len(f32) == len(bf16) == NUM_STEPS
    rel = np.abs(bf16 - f32) / f32
    assert rel.max() <= LOSS_RTOL, rel
    assert rel.max() > 0  # the bfloat16 run did compute in bfloat16
    assert f32[-1] < 0.95 * f32[0]  # the runs learn over these steps


@pytest.mark.slow
def test_bfloat16_digits_samples_are_recognised_by_the_classifier(tmp_path):
    """The digits recipe (800 steps) in bfloat16: >= 90% of 200 guided samples (20 per class)
    are recognised as their requested class (float32: 99.6% of 1,000, experiments/digits.py)."""
    flags = ("--config.model.dtype=bfloat16", "--config.sample.num_samples=200")
    result = cli.main(
        digits.get_config, _argv(tmp_path / "run", *flags, "--config.sample.batch_size=200")
    )
    assert result.status == "completed"
    with np.load(result.samples_path) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (200, 8, 8, 1)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 20))
    accuracy = train_digits_classifier(seed=0).accuracy(images, labels)
    assert accuracy >= 0.9, accuracy
