"""Tests for ddpm_jax.tfds_source: preparing a tfds dataset, or failing fast with instructions."""

import importlib.util
import logging
import socket
import time

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from ddpm_jax import data, tfds_source


def test_offline_without_tensorflow_fails_fast_with_instructions(tmp_path, caplog):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed; this checks the environment without it")
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    with pytest.raises(tfds_source.DataUnavailableError) as info:
        data.make_dataset("cifar10", global_batch_size=8, seed=0, data_dir=str(tmp_path))
    assert time.monotonic() - start < 15  # fail-fast requirement (the real cost is ~0.1 s)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in (
        "tensorflow",
        'pip install -e ".[prepare]"',
        "cifar-10-binary.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "--config.data.manual_dir",
        "--config.data.data_dir",
        str(tmp_path),
    ):
        assert needle in msg, needle
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert not caplog.records  # the message is the only output (no tfds warnings)


def test_no_network_and_no_archive_fails_fast(tmp_path, monkeypatch):
    hosts = []
    monkeypatch.setattr(tfds_source, "_missing_prepare_modules", lambda: [])
    monkeypatch.setattr(tfds_source, "_network_reachable", lambda host: hosts.append(host) or False)
    with pytest.raises(tfds_source.DataUnavailableError, match="www.cs.toronto.edu unreachable"):
        data.make_dataset(
            "cifar10",
            global_batch_size=8,
            seed=0,
            data_dir=str(tmp_path),
            manual_dir=str(tmp_path / "manual"),
        )
    assert hosts == ["www.cs.toronto.edu"]


def test_manual_archive_skips_network_and_preparation_errors_become_one_message(
    tmp_path, monkeypatch
):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not really")
    calls = []

    def fake_prepare(self, **kwargs):
        calls.append(kwargs)
        raise NonMatchingChecksumError("checksum mismatch\nmore detail")

    monkeypatch.setattr(tfds_source, "_missing_prepare_modules", lambda: [])
    monkeypatch.setattr(
        tfds_source, "_network_reachable", lambda host: pytest.fail("network probed")
    )
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
    with pytest.raises(tfds_source.DataUnavailableError) as info:
        data.make_dataset(
            "cifar10",
            global_batch_size=8,
            seed=0,
            data_dir=str(tmp_path / "d"),
            manual_dir=str(manual),
        )
    assert "preparing failed with NonMatchingChecksumError: checksum mismatch" in str(info.value)
    assert "\n" not in str(info.value)
    (kwargs,) = calls
    assert kwargs["file_format"] == "array_record"
    assert str(kwargs["download_config"].manual_dir) == str(manual)


def test_unprepared_dataset_is_prepared_then_read(monkeypatch):
    calls = []
    with tfds.testing.mock_data(num_examples=6):  # download_and_prepare is a no-op here
        original = tfds.core.DatasetBuilder.download_and_prepare
        monkeypatch.setattr(tfds_source, "_missing_prepare_modules", lambda: [])
        monkeypatch.setattr(tfds_source, "_network_reachable", lambda host: True)
        monkeypatch.setattr(
            tfds.core.DatasetBuilder,
            "download_and_prepare",
            lambda self, **kw: calls.append(kw) or original(self, **kw),
        )
        ds = data.make_dataset(
            "cifar10", global_batch_size=3, seed=0, process_count=1, process_index=0
        )
        assert ds.num_examples == 6 and ds.batch(1)["image"].shape == (3, 32, 32, 3)
    assert len(calls) == 1 and calls[0]["file_format"] == "array_record"


def test_network_probe_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert tfds_source._network_reachable("127.0.0.1", port=port, timeout=2.0)
    assert not tfds_source._network_reachable("127.0.0.1", port=port, timeout=2.0)  # now closed
