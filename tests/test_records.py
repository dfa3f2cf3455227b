"""Tests of ddpm_jax.records: metrics.jsonl and TensorBoard event files agree, and a resumed run
never records a step twice (read back with TensorBoard's own event reader)."""

import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax.records import RunRecords

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_tensorboard(logdir):
    """{tag: [(step, value)]} of the scalars and {tag: [step]} of the images TensorBoard shows."""
    sizes = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance=sizes)
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images


def test_scalars_and_images_agree_with_metrics_jsonl(tmp_path):
    records = RunRecords(str(tmp_path), start_step=0)
    for step in (1, 2, 3):
        records.scalars({"step": step, "loss": 1.0 / step, "lr": 1e-3, "note": "text"})
    records.scalars({"step": 3, "eval/digits_fid": 12.5})
    grid = np.random.default_rng(0).integers(0, 256, (9, 9, 1), np.uint8)
    records.image("samples", grid, 3)
    records.close()
    scalars, images = read_tensorboard(tmp_path / "tensorboard")
    logged = records.metrics.read()
    assert scalars["loss"] == [(r["step"], np.float32(r["loss"])) for r in logged if "loss" in r]
    assert scalars["eval/digits_fid"] == [(3, 12.5)] and "note" not in scalars
    assert images == {"samples": [3]}


def test_a_resumed_run_records_no_step_twice(tmp_path):
    records = RunRecords(str(tmp_path), start_step=0)
    for step in range(1, 8):  # killed after step 7; its last checkpoint is step 4
        records.scalars({"step": step, "loss": float(step)})
    records.image("samples", np.zeros((4, 4, 3), np.uint8), 6)
    records.close()
    resumed = RunRecords(str(tmp_path), start_step=4)
    for step in range(5, 10):
        resumed.scalars({"step": step, "loss": 10.0 * step})
    resumed.close()
    scalars, images = read_tensorboard(tmp_path / "tensorboard")
    want = [(s, float(s)) for s in range(1, 5)] + [(s, 10.0 * s) for s in range(5, 10)]
    assert scalars["loss"] == want
    assert [(r["step"], r["loss"]) for r in resumed.metrics.read()] == want
    assert images.get("samples", []) == []  # the grid of step 6 was purged with the steps > 4


def test_tensorboard_records_do_not_import_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed; a run's records must not (seconds at
    every start). A fresh interpreter, as a run starts."""
    pytest.importorskip("torch")
    code = (
        "import sys, numpy as np; from ddpm_jax.records import RunRecords; "
        f"r = RunRecords({str(tmp_path)!r}, 0); r.scalars({{'step': 1, 'loss': 1.0}}); "
        "r.image('samples', np.zeros((9, 9, 1), np.uint8), 1); r.close(); "
        "assert r.metrics.read() and 'tensorboardX' in sys.modules; print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
    scalars, images = read_tensorboard(tmp_path / "tensorboard")
    assert scalars == {"loss": [(1, 1.0)]} and images == {"samples": [1]}
