"""Tests for ddpm_jax.workdir: atomic writes, metrics.jsonl, the work-directory check, RNG tags."""

import os

import jax
import numpy as np
import pytest

from ddpm_jax import workdir
from ddpm_jax.errors import UsageError


def test_atomic_open_replaces_the_file_or_leaves_it_untouched(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with workdir.atomic_open(path, "w") as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), workdir.atomic_open(path, "w") as f:
        f.write("half of the second")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"
    assert sorted(os.listdir(path.parent)) == ["file.txt"]  # no temporary left behind


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    """Not mkstemp's 0o600: a run's files are readable by whoever may read the directory."""
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    workdir.write_json(tmp_path / "a.json", {})
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == os.stat(ordinary).st_mode & 0o777


def test_json_and_npz_round_trip(tmp_path):
    workdir.write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    assert workdir.read_json(tmp_path / "a.json") == {"a": [1.5, None], "b": 1}
    (tmp_path / "bad.json").write_text("{not json")
    assert workdir.read_json(tmp_path / "bad.json") is None
    assert workdir.read_json(tmp_path / "missing.json") is None
    path = workdir.save_npz(tmp_path / "x.npz", images=np.arange(6, dtype=np.uint8))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["images"], np.arange(6))


def test_metrics_log_appends_skips_torn_lines_and_cuts_back(tmp_path):
    log = workdir.JsonLines(tmp_path / "metrics.jsonl")
    assert log.read() == []
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a kill
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.cut(2)
    assert log.read() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    log.cut(0)
    assert log.read() == [] and os.path.exists(log.path)


def test_check_workdir(tmp_path):
    assert workdir.check_workdir(tmp_path / "new" / "run") == str(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # nothing is created
    (tmp_path / "file").write_text("")
    for bad, message in [
        (None, "workdir is missing"),
        (" ", "workdir is missing"),
        (tmp_path / "file", "is not a directory"),
        (tmp_path / "file" / "run", "is not a directory"),
    ]:
        with pytest.raises(UsageError, match=message):
            workdir.check_workdir(bad)


def test_run_keys_are_distinct_from_each_other_and_from_step_keys():
    tags = [workdir.INIT_TAG, workdir.GRID_TAG, workdir.FINAL_TAG, workdir.EVAL_TAG]
    tags.append(workdir.VAE_TAG)
    keys = {tuple(np.asarray(jax.random.key_data(workdir.run_key(0, t)))) for t in tags}
    steps = {
        tuple(np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(0), s))))
        for s in range(100)
    }
    assert len(keys) == len(tags) and not keys & steps
    assert min(tags) > 10**9  # far above any step index
