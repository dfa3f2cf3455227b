"""Tests of ``python -m experiments.sample``: a digits run (its samples again, on 1, 3 and 8
devices, bit for bit), labels, a published diffusers pipeline folder, and one-line errors."""

import json
import os
import subprocess
import sys

import _train_worker as worker
import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import train
from experiments import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny class-conditional digits run (8 devices) with its samples.npz of 16 samples."""
    workdir = str(tmp_path_factory.mktemp("sample") / "run")
    config = worker.tiny_config()
    config.train.num_steps = 4
    assert train.run(config, workdir).status == "completed"
    return workdir


def _sample_subprocess(cache_dir, devices, *args):
    env = wr.env(cache_dir, devices)
    cmd = [sys.executable, "-m", "experiments.sample", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_samples_of_a_run_are_its_samples_on_any_device_count(run_dir, cache_dir, tmp_path):
    with np.load(os.path.join(run_dir, "samples.npz")) as f:
        want, want_labels = f["images"], f["labels"]
    for devices in (1, 3, 8):
        out = str(tmp_path / f"d{devices}")
        proc = _sample_subprocess(
            cache_dir, devices, f"--workdir={run_dir}", "--num_samples=16", f"--out={out}"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"({devices} devices)" in proc.stdout and "sampling 16 images" in proc.stdout
        with np.load(os.path.join(out, "samples.npz")) as f:
            np.testing.assert_array_equal(f["images"], want)  # identical images
            np.testing.assert_array_equal(f["labels"], want_labels)
        assert os.path.exists(os.path.join(out, "samples.png"))


def test_labels_choose_the_classes(run_dir, tmp_path, capsys):
    out = sample.main(
        ["sample", f"--workdir={run_dir}", "--num_samples=6", "--labels=3,7", f"--out={tmp_path}"]
    )
    with np.load(os.path.join(out, "samples.npz")) as f:
        np.testing.assert_array_equal(f["labels"], [3, 7, 3, 7, 3, 7])
        assert f["images"].shape == (6, 8, 8, 1)
    assert "sampling 6 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --workdir"),
        (["--labels=11"], "--labels must lie in [0, 10]"),
        (["--prompt=a seven"], "--prompt needs a latent run"),
        (["--num_steps=1"], "--num_steps=1 is invalid: expected an integer >= 2"),
        (["--num_steps=101"], "--num_steps=101 is invalid: must be <= the number of timesteps"),
        (["--method=euler"], "--method='euler' is invalid"),
        (["--num_samples=0"], "--num_samples=0 must be >= 1"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(run_dir, tmp_path, capsys, args, message):
    if args:
        args = [f"--workdir={run_dir}", *args]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["sample", *args, f"--out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_samples_of_a_published_pipeline_folder(tmp_path, capsys):
    """A diffusers DDPM folder in the flat google/ddpm-* layout (random weights)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        norm_eps=1e-6,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
    )
    folder = tmp_path / "ddpm-tiny"
    unet.save_pretrained(folder)
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100}
    scheduler.update(beta_schedule="linear", clip_sample=True, variance_type="fixed_large")
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    out = sample.main(
        ["sample", f"--pretrained={folder}", "--num_samples=5", "--method=ddpm", "--num_steps=10"]
        + [f"--out={tmp_path / 'out'}"]
    )
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (5, 8, 8, 3) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["labels"], -1)
        assert f["images"].std() > 0
    assert "sampling 5 images (ddpm, 10 steps)" in capsys.readouterr().out

    # --noise: the x_T the seed draws gives the seed's samples; another shape is one line.
    import jax

    from ddpm_jax.workdir import FINAL_TAG, run_key

    keys = [jax.random.fold_in(run_key(0, FINAL_TAG), i) for i in range(5)]
    x_T = np.stack([jax.random.normal(jax.random.split(k)[0], (8, 8, 3)) for k in keys])
    np.save(tmp_path / "x_T.npy", x_T)
    args = ["sample", f"--pretrained={folder}", "--num_samples=5", "--method=ddpm"]
    args += ["--num_steps=10", f"--noise={tmp_path / 'x_T.npy'}"]
    again = sample.main([*args, f"--out={tmp_path / 'noise'}"])
    with np.load(os.path.join(out, "samples.npz")) as f, np.load(f"{again}/samples.npz") as g:
        np.testing.assert_array_equal(f["images"], g["images"])
    np.save(tmp_path / "x_T.npy", x_T[:, :4])
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*args, f"--out={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--noise" in err[0] and "(5, 8, 8, 3)" in err[0], err


def test_a_damaged_weights_file_is_one_line_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "ddpm-damaged"
    folder.mkdir()
    config = {"_class_name": "UNet2DModel", "sample_size": 8, "block_out_channels": [16, 32]}
    config.update(down_block_types=["DownBlock2D", "DownBlock2D"], norm_num_groups=8)
    config.update(up_block_types=["UpBlock2D", "UpBlock2D"], layers_per_block=1)
    config.update(freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00not a file")
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["sample", f"--pretrained={folder}", f"--out={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusion_pytorch_model.safetensors" in err[0], err
