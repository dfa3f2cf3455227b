"""Tests for the experiment entry points: experiments/cifar.py and experiments/digits.py.

- The configs: CIFAR-10 is Ho et al.'s recipe (35,746,307 UNet parameters, counted by
  ``jax.eval_shape``); the digits quickstart is a valid class-conditional CFG config.
- ``python -m experiments.cifar`` with no prepared data and no network (the socket layer of the
  subprocess refuses every connection) exits with code 2 and one line of instructions on stderr,
  without creating the work directory.
- The CIFAR-10 path end to end through ``train.run`` on ``tfds.testing.mock_data`` with a tiny
  UNet: every output file of the work directory, with its shapes and dtypes.
- The digits CLI end to end with every flag of the common command-line contract (in-process
  ``cli.main``, pmap), then re-run on the finished work directory; and bad flags exit with 2.

Data order per (seed, step), per-process slicing and flips are tested in tests/test_data.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import builders, cli, train
from ddpm_jax.config import validate
from experiments import cifar, digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m experiments.cifar` with every outgoing connection refused (an offline machine).
OFFLINE_MAIN = """
import errno, runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError(errno.ENETUNREACH, "network is unreachable (test)")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
sys.argv[0] = "experiments/cifar.py"
runpy.run_module("experiments.cifar", run_name="__main__", alter_sys=True)
"""


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoint_steps(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _count_params(config, num_classes=None):
    model = builders.build_model(config, num_classes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    t = jax.ShapeDtypeStruct((1,), np.int32)
    y = None if num_classes is None else jax.ShapeDtypeStruct((1,), np.int32)
    shapes = jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y=y), x, t, y)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- configs


def test_cifar_config_is_ho_et_al():
    c = cifar.get_config()
    validate(c, device_count=8, process_count=1)
    assert (c.data.name, c.data.random_flip) == ("cifar10", True)
    assert not c.model.class_conditional and c.model.dropout == 0.1
    assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ("linear", 1000)
    assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.prediction) == (
        1e-4,
        0.02,
        "eps",
    )
    t = c.train
    assert (t.num_steps, t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay) == (
        800_000,
        128,
        2e-4,
        5000,
        1.0,
        0.9999,
    )
    assert t.sample_every > 0 and c.sample.grid_size > 0 and c.sample.num_samples == 1000
    assert _count_params(c) == 35_746_307  # Ho et al.'s 35.7M-parameter CIFAR-10 UNet


def test_digits_config_is_a_valid_cfg_quickstart():
    c = digits.get_config()
    validate(c, device_count=8, process_count=1)  # the test setup's 8 devices
    validate(c, device_count=1, process_count=1)
    assert c.data.name == "digits" and c.model.class_conditional
    assert 0.1 <= c.train.p_uncond <= 0.2 and c.sample.guidance_scale > 1.0
    assert c.sample.num_samples == 1000 and c.train.sample_every > 0
    # Grids (grid_size² samples) and final samples run through one compiled sampler; the grid's
    # columns are the classes (labels cycle through 0..9).
    assert c.sample.batch_size == c.sample.grid_size**2 and c.sample.grid_size == 10


# ----------------------------------------------------------------------------- cifar offline


def test_cifar_without_data_or_network_exits_at_once_with_one_line(tmp_path):
    empty, workdir = tmp_path / "tfds", tmp_path / "run"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_MAIN,
            f"--workdir={workdir}",
            f"--config.data.data_dir={empty}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,  # the acceptance bound: instructions within 30 s, not a hang
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "'cifar10' is not prepared" in lines[0] and str(empty) in lines[0]
    assert "--config.data.manual_dir" in lines[0] and "cifar-10-binary.tar.gz" in lines[0]
    assert not workdir.exists()  # nothing written for a run that cannot start


# ----------------------------------------------------------------------------- cifar on mock data


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds mocked with 20 random examples per split, the datasets reported as prepared."""
    with tfds.testing.mock_data(num_examples=20):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        yield


def tiny_cifar_config():
    c = cifar.get_config()
    c.model.ch = 16
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (16,)
    c.model.num_groups = 8
    c.train.num_steps = 3
    c.train.batch_size = 8
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_every = 2
    c.train.steps_per_call = 1  # events at every step (the recipe scans 10 per call)
    c.sample.grid_size = 2
    c.sample.num_samples = 8
    c.sample.num_steps = 2
    return c


@pytest.mark.slow
def test_cifar_end_to_end_on_mock_data(mock_tfds, tmp_path, capsys):
    config, workdir = tiny_cifar_config(), str(tmp_path / "cifar")
    assert builders.build_dataset(config).random_flip  # flips on, as in Ho et al.
    result = train.run(config, workdir)
    assert (result.status, result.step) == ("completed", 3)
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "samples.npz" in out and "metrics.jsonl" in out

    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(config.to_json())
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"step", "loss", "steps_per_sec"} <= set(m)
        assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["steps_per_sec"] > 0
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000002.png"]
    png = Image.open(os.path.join(workdir, "samples", "step_0000002.png"))
    assert png.mode == "RGB" and png.size == (2 * 129 + 1,) * 2  # 2x2 tiles enlarged 4x: >= 256
    assert _checkpoint_steps(workdir) == [2, 3]
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 3)
    assert np.issubdtype(labels.dtype, np.integer) and labels.shape == (8,)
    np.testing.assert_array_equal(labels, -1)  # unconditional model
    assert images.std() > 0 and len({im.tobytes() for im in images}) == 8  # distinct samples


# ----------------------------------------------------------------------------- the CLI contract


@pytest.mark.slow
def test_digits_cli_with_every_contract_flag(tmp_path, capsys):
    workdir = str(tmp_path / "digits")
    argv = [
        "experiments/digits.py",
        f"--workdir={workdir}",
        # the common contract
        "--config.seed=3",
        "--config.train.num_steps=4",
        "--config.train.batch_size=16",
        "--config.train.log_every=2",
        "--config.train.checkpoint_every=2",
        "--config.model.dropout=0.1",
        "--config.parallel=pmap",
        "--config.sample.num_samples=16",
        "--config.sample.method=ddim",
        "--config.sample.num_steps=3",
        "--config.sample.guidance_scale=1.5",
        # a tiny model and run
        "--config.model.ch=16",
        "--config.model.ch_mult=(1,)",
        "--config.model.attn_resolutions=()",
        "--config.train.steps_per_call=2",
        "--config.train.sample_every=2",
        "--config.sample.grid_size=4",
        "--config.eval.every=0",
    ]
    result = cli.main(digits.get_config, argv)
    assert (result.status, result.step) == ("completed", 4)
    assert "done: 4 steps" in capsys.readouterr().out

    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["seed"] == 3 and saved["parallel"] == "pmap"
    assert saved["train"]["batch_size"] == 16 and saved["model"]["dropout"] == 0.1
    assert saved["sample"] == {**saved["sample"], "method": "ddim", "guidance_scale": 1.5}
    assert [m["step"] for m in _metrics(workdir)] == [2, 4]
    assert _checkpoint_steps(workdir) == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    png = Image.open(os.path.join(workdir, "samples", "step_0000004.png"))
    assert png.mode == "L" and png.size == (4 * 65 + 1, 4 * 65 + 1)  # 8x8 cells enlarged 8x
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(labels, np.arange(16) % 10)  # the requested classes

    # The same command again on the finished work directory: nothing is trained or rewritten.
    before = os.path.getmtime(os.path.join(workdir, "samples.npz"))
    again = cli.main(digits.get_config, argv)
    assert (again.status, again.step) == ("already_complete", 4)
    assert os.path.getmtime(os.path.join(workdir, "samples.npz")) == before


@pytest.mark.parametrize(
    "flag, field",
    [
        ("--config.parallel=threads", "parallel"),
        ("--config.sample.method=euler", "sample.method"),
        ("--config.train.batch_size=12", "train.batch_size"),  # not divisible by 8 devices
    ],
)
def test_experiment_cli_rejects_bad_flags_with_one_line(tmp_path, capsys, flag, field):
    workdir = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        cli.main(digits.get_config, ["digits.py", f"--workdir={workdir}", flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and field in err[0]
    assert not workdir.exists()
