"""Tests of the FID Inception in Flax (ddpm_jax.models.inception) and its torch-compatible resize.

The comparisons with torch build `tests/reference_inception_torch.py` (pytorch-fid's network)
with random weights; they skip when torch is not installed. With the real weights file at
$DDPM_JAX_FID_WEIGHTS, one more test checks them end to end. The weights file itself (reading,
conversion, download) is tested in test_weights_fid_inception.py, the `.pth` reader in
test_weights_pth.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import inception
from ddpm_jax.weights import pth
from ddpm_jax.weights.fid_inception import inception_from_pth, variables_from_torch

# --- resize ---------------------------------------------------------------------------------


def test_resize_bilinear_known_answers():
    x = np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1)
    up = inception.resize_bilinear(jnp.asarray(x), (1, 4))
    # Source positions (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> last).
    np.testing.assert_allclose(np.asarray(up).ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    down = inception.resize_bilinear(jnp.arange(4.0).reshape(1, 1, 4, 1), (1, 2))
    np.testing.assert_allclose(np.asarray(down).ravel(), [0.5, 2.5], atol=1e-6)  # no antialias
    const = inception.resize_bilinear(jnp.full((2, 5, 7, 3), 0.3), (299, 299))
    np.testing.assert_allclose(np.asarray(const), 0.3, rtol=1e-6)
    same = jnp.asarray(np.random.default_rng(0).random((1, 6, 6, 2), np.float32))
    assert inception.resize_bilinear(same, (6, 6)) is same


@pytest.mark.parametrize(
    "in_hw,out_hw", [((32, 32), (299, 299)), ((400, 350), (299, 299)), ((7, 13), (20, 5))]
)
def test_resize_bilinear_matches_torch(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random((2, *in_hw, 3), np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    got = inception.resize_bilinear(jnp.asarray(x), out_hw)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=2e-6)


# --- the Flax network against the torch reference -------------------------------------------


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """(torch model with random weights, features_fn loaded from its legacy-format .pth)."""
    torch = pytest.importorskip("torch")
    import reference_inception_torch as ref

    torch.manual_seed(0)
    model = ref.randomize_(ref.FIDInceptionV3(), seed=0)
    folder = tmp_path_factory.mktemp("inception")
    legacy, zipped = folder / "legacy.pth", folder / "zip.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    torch.save(model.state_dict(), zipped)
    from_legacy, from_zip = pth.load_pth(str(legacy)), pth.load_pth(str(zipped))
    assert list(from_legacy) == list(from_zip) == list(model.state_dict())
    for key in from_legacy:
        np.testing.assert_array_equal(from_legacy[key], from_zip[key])
    features_fn = inception_from_pth(str(legacy), batch_size=2, with_logits=True)
    return model, features_fn


def _torch_features(model, images):
    import torch

    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pool, logits = model(x)
    return pool.numpy(), logits.numpy()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("num,size", [(3, 32), (2, 64)])  # 3 with batch_size 2: padded batch
def test_features_match_torch_reference(torch_reference, num, size):
    model, features_fn = torch_reference
    images = np.random.default_rng(size).integers(0, 256, (num, size, size, 3), dtype=np.uint8)
    pool, logits = features_fn(images)
    ref_pool, ref_logits = _torch_features(model, images)
    assert pool.shape == (num, 2048) and logits.shape == (num, 1008)
    assert pool.dtype == np.float32
    assert np.abs(ref_pool).mean() > 0.05  # random weights kept activations alive
    assert _rel_err(pool, ref_pool) <= 1e-4
    assert _rel_err(logits, ref_logits) <= 1e-4


def test_features_fn_validates_images(torch_reference):
    _, features_fn = torch_reference
    with pytest.raises(ValueError, match="uint8"):
        features_fn(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        features_fn(np.zeros((1, 32, 32), np.uint8))


def test_matches_pytorch_fid_directly(tmp_path, monkeypatch):
    """Skips without pytorch-fid, which the ``torch`` extra does not install: it needs
    torchvision, whose compiled operators do not load against the pinned CPU torch and then
    break transformers' CLIP import (``pip install pytorch-fid`` with a matching torch runs it)."""
    pytest.importorskip("torch")
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    import reference_inception_torch as ref
    import torch

    state = ref.randomize_(ref.FIDInceptionV3(), seed=1).state_dict()
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    model = pytorch_fid_inception.InceptionV3([3]).eval()
    torch.save(state, tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    features_fn = inception_from_pth(str(tmp_path / "w.pth"), batch_size=2)
    images = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        (theirs,) = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    assert _rel_err(features_fn(images), theirs[:, :, 0, 0].numpy()) <= 1e-4


@pytest.mark.skipif(
    not os.environ.get("DDPM_JAX_FID_WEIGHTS"), reason="set DDPM_JAX_FID_WEIGHTS to the .pth file"
)
def test_real_fid_weights():
    path = os.environ["DDPM_JAX_FID_WEIGHTS"]
    features_fn = inception_from_pth(path, batch_size=2)
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = features_fn(images)
    assert features.shape == (2, 2048) and np.all(np.isfinite(features))
    torch = pytest.importorskip("torch")
    import reference_inception_torch as ref

    model = ref.FIDInceptionV3().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in pth.load_pth(path).items()})
    assert _rel_err(features, _torch_features(model, images)[0]) <= 1e-4


# --- without torch: a known answer through conversion, batching and the whole network -------


def _zero_conv_state_dict(rng):
    """A torch-layout state dict for the network with all-zero conv kernels, random BN and fc."""
    shapes = jax.eval_shape(
        inception.FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3))
    )
    suffixes = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean"}
    suffixes["var"] = "running_var"
    state = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        names = [p.key for p in path][1:]
        key = ".".join([*names[:-1], suffixes[names[-1]]])
        shape = leaf.shape
        if names[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], *shape[:2])
        if names[-2] == "conv":
            state[key] = np.zeros(shape, np.float32)
        elif names[-1] == "var":
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state[key] = rng.normal(size=shape).astype(np.float32)
    return state


def test_features_known_answer_with_zero_conv_kernels(tmp_path):
    # Every conv outputs 0, so each BasicConv outputs relu(bn(0)), a constant per channel, and
    # the pool features are Mixed_7c's branch outputs in concatenation order.
    state = _zero_conv_state_dict(np.random.default_rng(0))
    features_fn = inception.make_features_fn(
        variables_from_torch(state), batch_size=2, with_logits=True
    )
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    pool, logits = features_fn(images)

    def bn_of_zero(name):
        p = f"Mixed_7c.{name}.bn."
        scale = state[p + "weight"] / np.sqrt(state[p + "running_var"] + 1e-3)
        return np.maximum(state[p + "bias"] - state[p + "running_mean"] * scale, 0.0)

    branches = ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a"]
    branches += ["branch3x3dbl_3b", "branch_pool"]
    expected = np.concatenate([bn_of_zero(b) for b in branches])
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    np.testing.assert_allclose(pool, np.tile(expected, (3, 1)), rtol=1e-5, atol=1e-6)
    expected_logits = expected @ state["fc.weight"].T + state["fc.bias"]
    np.testing.assert_allclose(logits, np.tile(expected_logits, (3, 1)), rtol=1e-4, atol=1e-4)
