"""Class names on sample grids (``ddpm_jax.grid_names``) and their wiring: a 10-class folder run's
training grid and ``experiments.sample``'s PNG carry the names of ``folder.json``."""

import json
import os
import types

import _folders
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import folder_source, grid_names, images, train
from experiments import folder as folder_experiment, sample as sample_experiment

NAMES = [str(d) for d in range(10)]


def _tiles(n=20, size=8):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_a_band_of_names_above_the_columns_or_above_each_row():
    x = _tiles()
    plain = images.make_grid(x, 10, **images.READABLE)
    np.testing.assert_array_equal(grid_names.labelled_grid(x, 10), plain)
    np.testing.assert_array_equal(grid_names.labelled_grid(x, 10, np.full(20, -1), NAMES), plain)
    labels = np.arange(20) % 10  # column j: class j
    named = grid_names.labelled_grid(x, 10, labels, NAMES)
    band = grid_names.BAND
    assert named.shape == (plain.shape[0] + band, *plain.shape[1:])
    np.testing.assert_array_equal(named[band:], plain)
    assert (named[:band] < 128).any() and (named[:band] == 255).mean() > 0.5  # dark text on white
    # Other names, other pixels; the same names, the same pixels.
    other = grid_names.labelled_grid(x, 10, labels, [f"n{d}" for d in range(10)])
    assert (other[:band] != named[:band]).any()
    np.testing.assert_array_equal(grid_names.labelled_grid(x, 10, labels, NAMES), named)
    # Each name sits over its own column: swapping two labels' names swaps their cells.
    swapped = grid_names.labelled_grid(x, 10, labels, ["1", "0", *NAMES[2:]])
    cell = (plain.shape[1] - 1) // 10
    np.testing.assert_array_equal(
        swapped[:band, 1 : 1 + cell], named[:band, 1 + cell : 1 + 2 * cell]
    )
    # Columns that mix classes: a band above each row of tiles; RGB grids stay RGB.
    rgb = np.repeat(x, 3, -1)
    mixed = grid_names.labelled_grid(rgb, 8, labels, NAMES)
    plain8 = images.make_grid(rgb, 8, **images.READABLE)
    assert mixed.shape == (plain8.shape[0] + 3 * band, plain8.shape[1], 3)


def test_label_names_come_from_the_run_record(tmp_path):
    assert grid_names.label_names(str(tmp_path)) is None
    (tmp_path / folder_source.RUN_INFO).write_text(json.dumps({"classes": ["cat", "dog"]}))
    assert grid_names.label_names(str(tmp_path)) == ["cat", "dog"]
    # A latent run's labels are prompts: each gets its class's name ("" for none).
    assert grid_names.label_names(str(tmp_path), np.array([1, 0, -1, 1])) == [
        "dog",
        "cat",
        "",
        "dog",
    ]
    (tmp_path / folder_source.RUN_INFO).write_text(json.dumps({"classes": []}))
    assert grid_names.label_names(str(tmp_path)) is None


def test_the_training_grid_passes_the_labels_and_the_runs_names(tmp_path):
    """``Trainer._sample_grid`` with a stand-in generator: the PNG is ``labelled_grid`` of the
    generator's images and labels with the trainer's ``label_names``."""
    x, labels = _tiles(100), np.arange(100) % 10
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(sample=types.SimpleNamespace(grid_size=10), seed=0),
        dp=types.SimpleNamespace(from_step=lambda p: p),
        generator=lambda params, key, n: (x[:n], labels[:n]),
        label_names=[f"class {d}" for d in range(10)],
        workdir=str(tmp_path),
    )
    written = []
    records = types.SimpleNamespace(image=lambda tag, grid, step: written.append(grid))
    train.Trainer._sample_grid(fake, types.SimpleNamespace(ema_params=None), 7, records)
    png = np.asarray(Image.open(tmp_path / "samples" / "step_0000007.png"))[..., None]
    expected = grid_names.labelled_grid(x, 10, labels, fake.label_names)
    np.testing.assert_array_equal(png, expected)
    np.testing.assert_array_equal(written[0], expected)


@pytest.mark.slow
def test_a_folder_runs_training_grid_and_sampled_png_carry_its_class_names(tmp_path):
    """(48 s on 2 busy cores) a 10-class folder run end to end: its training grid and
    ``experiments.sample``'s PNG name the classes of ``folder.json``."""
    root, workdir = str(tmp_path / "digits"), str(tmp_path / "run")
    _folders.write_digits_folder(root, size=8, limit=40)
    argv = ["folder.py", f"--workdir={workdir}", f"--config.data.dir={root}"]
    argv += [f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.image_size=8"]
    argv += ["--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.train.num_steps=2"]
    argv += ["--config.train.batch_size=8", "--config.sample.num_samples=0"]
    argv += ["--config.train.sample_every=2", "--config.train.steps_per_call=1"]
    argv += ["--config.sample.num_steps=2", "--config.sample.batch_size=100"]
    assert folder_experiment.main(argv).status == "completed"
    names = json.load(open(os.path.join(workdir, folder_source.RUN_INFO)))["classes"]
    assert names == NAMES
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_0000002.png")))[..., None]
    band = grid_names.BAND
    tiles = np.zeros((100, 8, 8, 1), np.uint8)
    expected = grid_names.labelled_grid(tiles, 10, np.arange(100) % 10, names)
    assert grid.shape == expected.shape
    np.testing.assert_array_equal(grid[:band], expected[:band])
    out = str(tmp_path / "sampled")
    sample_experiment.main(
        ["sample.py", f"--workdir={workdir}", "--num_samples=10", "--num_steps=2", f"--out={out}"]
    )
    with np.load(os.path.join(out, "samples.npz")) as f:
        imgs, labels = f["images"], f["labels"]
    png = np.asarray(Image.open(os.path.join(out, "samples.png")))[..., None]
    np.testing.assert_array_equal(png, grid_names.labelled_grid(imgs, 4, labels, names))
    assert png.shape[0] == images.make_grid(imgs, 4, **images.READABLE).shape[0] + 3 * band
