"""The FID Inception weights: pytorch-fid's ``pt_inception-2015-12-05`` ``.pth`` file, in Flax.

- `FID_WEIGHTS_URL`, `download_fid_weights`: the file, downloaded once into a cache folder and
  checked against the SHA-256 prefix in its name (torch.hub's convention).
- `variables_from_torch`: its torch state dict -> the variables of
  :class:`ddpm_jax.models.inception.FIDInceptionV3` (a rename plus layout transposes).
- `inception_from_pth`: the file -> the feature extractor of pytorch-fid / clean-fid
  (:func:`ddpm_jax.models.inception.make_features_fn`), read without torch and without arbitrary
  unpickling (:mod:`ddpm_jax.weights.pth`).

A file that is missing, damaged or not these weights, and a download that fails, raise
:class:`ddpm_jax.errors.UsageError` with one line naming the file and what to do.

Example:
    >>> features_fn = inception_from_pth("pt_inception-2015-12-05-6726825d.pth")
    >>> features_fn(images_uint8)  # [N, H, W, 3] uint8 -> [N, 2048] float32 pool features
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UsageError
from ddpm_jax.models.inception import INPUT_SIZE, FIDInceptionV3, make_features_fn
from ddpm_jax.weights import pth

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = FID_WEIGHTS_URL.rsplit("/", 1)[1]
# torch.hub convention: the hex digits at the end of the file name start the file's SHA-256.
_FID_WEIGHTS_SHA256_PREFIX = "6726825d"


def variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Converts the torch state dict of the FID Inception to Flax variables.

    `*.conv.weight` [O, I, kh, kw] -> `conv.kernel` [kh, kw, I, O]; `*.bn.{weight, bias}` ->
    params `bn.{scale, bias}`; `*.bn.running_{mean, var}` -> batch_stats `bn.{mean, var}`;
    `fc.weight` [1008, 2048] -> `fc.kernel` [2048, 1008]. `num_batches_tracked` is ignored.

    Args:
        state_dict: torch parameter name -> array in torch layout (any float dtype), e.g. from
            `ddpm_jax.weights.pth.load_state_dict`.

    Returns:
        {"params": ..., "batch_stats": ...} of float32 arrays for `FIDInceptionV3`.

    Raises:
        ValueError: missing or unexpected keys, or shapes that differ from the network's.
    """
    variables: dict = {"params": {}, "batch_stats": {}}
    renames = {
        "conv.weight": ("params", "kernel", (2, 3, 1, 0)),
        "bn.weight": ("params", "scale", None),
        "bn.bias": ("params", "bias", None),
        "bn.running_mean": ("batch_stats", "mean", None),
        "bn.running_var": ("batch_stats", "var", None),
    }
    unexpected = []
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if key in ("fc.weight", "fc.bias"):
            collection, path = "params", ["fc", "kernel" if key == "fc.weight" else "bias"]
            perm = (1, 0) if key == "fc.weight" else None
        elif ".".join(parts[-2:]) in renames:
            collection, leaf, perm = renames[".".join(parts[-2:])]
            path = [*parts[:-1], leaf]
        else:
            unexpected.append(key)
            continue
        array = np.asarray(value, np.float32)
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array if perm is None else np.ascontiguousarray(array.transpose(perm))
    expected = jax.eval_shape(
        FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    )
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)
    }
    missing = sorted(set(want) - set(got))
    unexpected += sorted(set(got) - set(want))
    wrong = sorted(f"{k}: {got[k]} != {want[k]}" for k in set(want) & set(got) if got[k] != want[k])
    if missing or unexpected or wrong:
        raise ValueError(
            "state dict does not match the FID Inception-v3: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]} "
            f"({len(missing)} / {len(unexpected)} / {len(wrong)} in all)"
        )
    return variables


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax")


def download_fid_weights(cache_dir: str | None = None) -> str:
    """Returns the path of the FID Inception weights, downloading them once into `cache_dir`.

    The download goes to `<file>.part` and is renamed into place only once its SHA-256 matches,
    so an interrupted download is never taken for the weights.

    Args:
        cache_dir: where the file is kept (default $XDG_CACHE_HOME/ddpm_jax or
            ~/.cache/ddpm_jax).

    Returns:
        The path of `pt_inception-2015-12-05-6726825d.pth` in `cache_dir`.

    Raises:
        UsageError: the file is not cached and cannot be downloaded (e.g. offline), or the
            download does not match the expected SHA-256 prefix; the message names the file to
            download and says to pass its path.
    """
    cache_dir = cache_dir or _default_cache_dir()
    path = os.path.join(cache_dir, FID_WEIGHTS_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".part"
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=60) as response:
            with open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        reason = " ".join(str(e).split())
        raise UsageError(
            f"could not download the FID Inception weights {FID_WEIGHTS_URL} ({reason}); "
            f"download {FID_WEIGHTS_NAME} where there is network access and pass its path "
            "(--inception_path, or path=...)"
        ) from e
    with open(partial, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith(_FID_WEIGHTS_SHA256_PREFIX):
        os.remove(partial)
        raise UsageError(
            f"the download of {FID_WEIGHTS_URL} has SHA-256 {digest}, expected a prefix "
            f"{_FID_WEIGHTS_SHA256_PREFIX}, and was removed; download {FID_WEIGHTS_NAME} again "
            "and pass its path (--inception_path, or path=...)"
        )
    os.replace(partial, path)
    return path


def inception_from_pth(
    path: str | None = None,
    *,
    batch_size: int = 50,
    with_logits: bool = False,
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
    cache_dir: str | None = None,
) -> Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """The FID feature extractor of pytorch-fid, in JAX.

    The network is the one pytorch-fid and clean-fid use; the preprocessing is pytorch-fid's
    (clean-fid's "legacy_pytorch" mode): uint8 -> [0, 1] -> bilinear resize to 299x299 (torch's
    `align_corners=False`, no antialiasing) -> [-1, 1] -> FID Inception-v3 -> 2048-d features
    after the global average pool.

    Args:
        path: the `pt_inception-2015-12-05-6726825d.pth` file. None: use the cached copy or
            download it (`download_fid_weights`); offline, pass the path.
        batch_size: images per device call; the last batch is zero-padded, so the network
            compiles once (the resize compiles once per input image size).
        with_logits: also return the 1008 logits of the network's classifier (for the
            Inception Score: softmax them).
        precision: precision of convolutions and the classifier (HIGHEST: true float32 on
            accelerators that would otherwise use reduced-precision passes).
        cache_dir: where downloads go (default $XDG_CACHE_HOME/ddpm_jax or ~/.cache/ddpm_jax).

    Returns:
        `features_fn(images)`: images [N, H, W, 3] uint8 -> pool features [N, 2048] float32
        NumPy (and logits [N, 1008] when `with_logits`).

    Raises:
        UsageError: the file is missing, damaged or not the FID Inception weights, or (path
            None) cannot be downloaded; the message names the file.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if path is None:
        path = download_fid_weights(cache_dir)
    state_dict = pth.load_state_dict(path)
    try:
        variables = variables_from_torch(state_dict)
    except ValueError as e:
        raise UsageError(
            f"{path} is not the FID Inception weights {FID_WEIGHTS_NAME}: {e}; pass that file"
        ) from e
    return make_features_fn(
        variables, batch_size=batch_size, with_logits=with_logits, precision=precision
    )
