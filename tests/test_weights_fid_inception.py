"""Tests of ddpm_jax.weights.fid_inception: the weights file, its conversion and its download.

The network's numerics (against torch and pytorch-fid) are tested in test_inception.py; here a
mismatched state dict, a cached or failed download and a missing, damaged or wrong weights file.
"""

import struct
import urllib.error

import numpy as np
import pytest

from ddpm_jax.errors import UsageError
from ddpm_jax.weights import fid_inception


def _assert_one_line_naming(error, text):
    message = str(error)
    assert text in message and "\n" not in message, message


def test_variables_from_torch_rejects_a_mismatched_state_dict():
    with pytest.raises(ValueError, match="missing .*unexpected \\['foo.bar'\\]"):
        fid_inception.variables_from_torch({"foo.bar": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="wrong shapes"):
        fid_inception.variables_from_torch({"fc.weight": np.zeros((10, 2048), np.float32)})


def test_download_fid_weights_uses_the_cached_file(tmp_path):
    cached = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    cached.write_bytes(struct.pack("<q", 0))
    assert fid_inception.download_fid_weights(str(tmp_path)) == str(cached)


def test_offline_download_is_a_usage_error_saying_what_to_download(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        (tmp_path / "pt_inception-2015-12-05-6726825d.pth.part").write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fid_inception.urllib.request, "urlopen", offline)
    for call in (
        lambda: fid_inception.download_fid_weights(str(tmp_path)),
        lambda: fid_inception.inception_from_pth(cache_dir=str(tmp_path)),
    ):
        with pytest.raises(UsageError, match="could not download .*pass its path") as info:
            call()
        _assert_one_line_naming(info.value, "pt_inception-2015-12-05-6726825d.pth")
        _assert_one_line_naming(info.value, fid_inception.FID_WEIGHTS_URL)
    assert list(tmp_path.iterdir()) == []  # the partial download was removed


def test_a_download_with_the_wrong_checksum_is_removed(tmp_path, monkeypatch):
    class _Response:
        def __init__(self):
            self.chunks = [b"not the weights"]

        def read(self, *args):
            return self.chunks.pop() if self.chunks else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(fid_inception.urllib.request, "urlopen", lambda *a, **k: _Response())
    with pytest.raises(UsageError, match="SHA-256 .*download .* again") as info:
        fid_inception.download_fid_weights(str(tmp_path))
    _assert_one_line_naming(info.value, "pt_inception-2015-12-05-6726825d.pth")
    assert list(tmp_path.iterdir()) == []


def test_missing_damaged_or_wrong_weights_files_are_usage_errors(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(UsageError, match="not found") as info:
        fid_inception.inception_from_pth(str(missing))
    _assert_one_line_naming(info.value, str(missing))

    torch = pytest.importorskip("torch")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, wrong)
    with pytest.raises(UsageError, match="is not the FID Inception weights .*wrong shapes") as info:
        fid_inception.inception_from_pth(str(wrong))
    _assert_one_line_naming(info.value, str(wrong))

    truncated = tmp_path / "truncated.pth"
    data = wrong.read_bytes()
    for size in (len(data) - 8, len(data) // 2, 10):
        truncated.write_bytes(data[:size])
        with pytest.raises(UsageError, match="is damaged .*download it again") as info:
            fid_inception.inception_from_pth(str(truncated))
        _assert_one_line_naming(info.value, str(truncated))
