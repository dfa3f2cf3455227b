"""Tests of ddpm_jax.weights.pth: the `.pth` reader that never unpickles arbitrary globals.

`load_pth` is compared with `torch.load` when torch is installed; `load_state_dict` turns every
problem with a user's file into a one-line UsageError that names it.
"""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from ddpm_jax.errors import UsageError
from ddpm_jax.weights import pth


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_stream(obj_pickle: bytes) -> bytes:
    head = b"".join(
        pickle.dumps(v, protocol=2)
        for v in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    return head + obj_pickle + pickle.dumps([], protocol=2)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_load_pth_refuses_arbitrary_globals(tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Evil(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(_legacy_stream(payload))
    with pytest.raises(pth.UnsafePickleError, match="posix.system|os.system"):
        pth.load_pth(str(path))
    assert not marker.exists()


def test_load_pth_rejects_non_torch_file(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(pickle.UnpicklingError, match="magic number"):
        pth.load_pth(str(path))


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_pth_matches_torch_load(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen)
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    state.update(
        transposed=base.t(),  # non-contiguous
        row_view=base[2],  # storage offset into a shared storage
        shared=base,
        half=torch.randn(3, generator=gen).half(),
        double=torch.randn(2, 2, generator=gen).double(),
        ints=torch.arange(7, dtype=torch.int32)[2:],
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ours = pth.load_pth(str(path))
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    assert ours._metadata == theirs._metadata
    for key, value in theirs.items():
        assert ours[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


# --- load_state_dict: a user's file -------------------------------------------------------


def _assert_usage_error(path, match):
    """load_state_dict(path) raises UsageError: one line that names the file, matches `match`."""
    with pytest.raises(UsageError, match=match) as info:
        pth.load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message


def _torch_state_dict(torch):
    gen = torch.Generator().manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    state["half"] = torch.randn(3, 5, generator=gen).half()
    return state


@pytest.mark.parametrize("zip_format", [True, False])
def test_load_state_dict_returns_what_load_pth_returns(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    path = tmp_path / "state.pth"
    torch.save(_torch_state_dict(torch), path, _use_new_zipfile_serialization=zip_format)
    ours, raw = pth.load_state_dict(path), pth.load_pth(str(path))
    assert list(ours) == list(raw)
    for key, value in raw.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_pth_is_a_usage_error_naming_the_file(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    path = tmp_path / "state.pth"
    torch.save(_torch_state_dict(torch), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    for size in (len(data) - 8, len(data) // 2, 100, 10, 0):
        path.write_bytes(data[:size])
        _assert_usage_error(path, "is damaged .*download it again")


def test_damaged_files_without_torch_are_usage_errors(tmp_path):
    stream = _legacy_stream(pickle.dumps(collections.OrderedDict(a=1), protocol=2))
    path = tmp_path / "legacy.pth"
    for size in (len(stream) - 3, 30, 1, 0):
        path.write_bytes(stream[:size])
        _assert_usage_error(path, "is damaged")
    path.write_bytes(b"PK\x03\x04 a broken zip archive")
    _assert_usage_error(path, "is damaged")
    path.write_bytes(pickle.dumps({"a": 1}))  # a plain pickle, not a torch file
    _assert_usage_error(path, "is damaged .*magic number")


def test_missing_unsafe_and_non_state_dict_files_are_usage_errors(tmp_path):
    _assert_usage_error(tmp_path / "missing.pth", "not found")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(_legacy_stream(pickle.dumps({"weight": _Evil(marker)}, protocol=2)))
    _assert_usage_error(evil, "not a plain state dict .*refusing to load global")
    assert not marker.exists()
    not_a_dict = tmp_path / "list.pth"
    not_a_dict.write_bytes(_legacy_stream(pickle.dumps([1, 2], protocol=2)))
    _assert_usage_error(not_a_dict, "holds a list, not a state dict")
    nested = tmp_path / "nested.pth"
    nested.write_bytes(_legacy_stream(pickle.dumps({"state_dict": {}}, protocol=2)))
    _assert_usage_error(nested, "not a state dict: its entry 'state_dict' is a dict")
