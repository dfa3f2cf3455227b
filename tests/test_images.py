"""Tests for ddpm_jax.images: uint8 conversion, grids and atomic PNG writes."""

import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images as im


def test_to_uint8_known_values_rounding_and_clipping():
    x = np.array([-2.0, -1.0, -1 + 0.6 / 127.5, -1 + 0.4 / 127.5, 0.0, 1.0, 3.0], np.float32)
    # (x + 1) * 127.5 = [-127.5, 0, 0.6, 0.4, 127.5, 255, 510] → round, clip.
    np.testing.assert_array_equal(im.to_uint8(x), [0, 0, 1, 0, 128, 255, 255])
    assert im.to_uint8(x).dtype == np.uint8


def test_to_uint8_inverts_the_data_scaling_exactly():
    u = np.arange(256, dtype=np.uint8)
    x = u.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # ddpm_jax.data's scaling
    np.testing.assert_array_equal(im.to_uint8(x), u)
    np.testing.assert_array_equal(im.to_uint8(u), u)  # uint8 passes through
    with pytest.raises(ValueError, match="dtype"):
        im.to_uint8(np.arange(3))


def test_make_grid_layout_and_padding():
    imgs = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = im.make_grid(imgs, ncols=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[1 + 3 * r : 1 + 3 * r + 2, 1 + 4 * c : 1 + 4 * c + 3]
        assert (tile == 10 * (i + 1)).all()
    # Padding lines and the empty 6th tile are black; total mass equals the tiles' mass.
    assert grid[0].sum() == 0 and grid[:, 0].sum() == 0 and grid[3].sum() == 0
    assert grid[4:6, 9:12].sum() == 0
    assert grid.sum() == imgs.astype(np.int64).sum()


def test_make_grid_float_input_no_padding_and_validation():
    x = np.linspace(-1, 1, 2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    grid = im.make_grid(x, ncols=5, padding=0)  # ncols capped at N = 2
    np.testing.assert_array_equal(grid, np.concatenate(list(im.to_uint8(x)), axis=1))
    assert im.make_grid(np.zeros((1, 4, 4), np.uint8), 1).shape == (6, 6, 1)
    with pytest.raises(ValueError, match="ncols"):
        im.make_grid(x, ncols=0)
    with pytest.raises(ValueError, match="padding"):
        im.make_grid(x, ncols=1, padding=-1)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_png_grid_roundtrip_atomic(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 5, 6, channels), dtype=np.uint8)
    path = tmp_path / "sub" / "grid.png"
    assert im.save_png_grid(path, imgs, ncols=2) == str(path)
    with Image.open(path) as f:
        assert f.mode == mode
        loaded = np.asarray(f)
    expected = im.make_grid(imgs, ncols=2, **im.READABLE)
    np.testing.assert_array_equal(loaded, expected[..., 0] if channels == 1 else expected)
    assert os.listdir(path.parent) == ["grid.png"]  # no temp file left behind
    im.save_png_grid(path, imgs[:1], ncols=1)  # overwrites in place
    with Image.open(path) as f:
        assert f.size == (43 * 6 + 2, 43 * 5 + 2)  # one 5x6 cell enlarged 43x: 260 >= 256 wide


def test_resize_of_one_image_and_of_a_batch():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    up = im.resize(batch, (16, 16))
    assert up.shape == (3, 16, 16, 1) and up.dtype == np.uint8
    np.testing.assert_array_equal(up[1], im.resize(batch[1], (16, 16)))
    flat = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(im.resize(flat, (4, 6)), np.full((4, 6, 3), 77))
    with pytest.raises(ValueError, match="uint8"):
        im.resize(batch.astype(np.float32), (4, 4))


def test_readable_grids_enlarge_small_images_with_thin_separators():
    digits = np.arange(100 * 8 * 8, dtype=np.int64).reshape(100, 8, 8, 1) % 256
    scale = 4  # the smallest factor that reaches 256: 10 * 8 * 4 + 11 = 331 >= 256 > 10 * 24 + 11
    grid = im.make_grid(digits.astype(np.uint8), 10, **im.READABLE)
    assert grid.shape == (10 * (8 * scale + 1) + 1,) * 2 + (1,)
    cell = grid[1 : 1 + 8 * scale, 1 : 1 + 8 * scale, 0]
    np.testing.assert_array_equal(cell, np.kron(digits[0, ..., 0], np.ones((scale, scale))))
    assert (grid[0] == 128).all() and (grid[:, 8 * scale + 1] == 128).all()  # separators
    big = np.zeros((4, 300, 300, 3), np.uint8)
    assert im.make_grid(big, 2, **im.READABLE).shape == (603, 603, 3)  # large: never shrunk
