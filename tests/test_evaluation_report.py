"""Tests of ddpm_jax.evaluation.report: JSON reports, Markdown tables and matplotlib charts.

Everything runs on synthetic results (no model): the files' contents, the charts' pixel sizes
(640 x 420 per panel at 100 dpi), and that each panel draws its first series in matplotlib's first
color (C0 = #1f77b4) and the next panel of ``plot_run`` in C1 (#ff7f0e).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import report
from ddpm_jax.workdir import JsonLines

C0, C1 = (31, 119, 180), (255, 127, 14)


def _cell(method, steps, scale, n, fid, accuracy):
    metrics = {"fid": fid, "kid_mean": fid / 100, "kid_std": 0.001, "accuracy": accuracy}
    return dict(
        method=method,
        num_steps=steps,
        guidance_scale=scale,
        num_samples=n,
        metrics=metrics,
        sample_s=1.5,
        images_per_s=10.0,
        metrics_s=0.1,
    )


def _sweep_result():
    return {
        "run": "/runs/digits",
        "checkpoint_step": 800,
        "dataset": "digits",
        "extractor": "digits_cnn-0123456789",
        "num_timesteps": 1000,
        "steps": [
            _cell("ddim", 4, 2.0, 16, 7.0, 0.9),
            _cell("ddim", 10, 2.0, 16, 5.0, 0.95),
            _cell("dpmpp_2m", 3, 2.0, 8, 6.0, 0.875),
        ],
        "guidance": [_cell("ddim", 4, 0.0, 16, 9.0, 0.5), _cell("ddim", 4, 2.0, 16, 7.0, 0.9)],
        "floor": {
            "split": "test",
            "num_images": 360,
            "metrics": {"fid": 1.8, "kid_mean": 0.01, "kid_std": 0.001, "accuracy": 0.99},
            "seconds": 0.5,
        },
    }


def _pixels(path):
    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB"))


def _has(pixels, color):
    return bool(np.any(np.all(pixels == color, axis=-1)))


def test_write_sweep(tmp_path):
    result = _sweep_result()
    paths = report.write_sweep(result, str(tmp_path / "sweep"))
    assert sorted(os.listdir(tmp_path / "sweep")) == [
        "sweep.json",
        "sweep.md",
        "sweep_guidance.png",
        "sweep_steps.png",
    ]
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved == result and saved["steps"][2]["method"] == "dpmpp_2m"
    md = open(paths["markdown"]).read()
    assert md == report.sweep_markdown(result)
    assert "| ddim | 4 | 16 |" in md and "test split (floor)" in md and "accuracy" in md
    # Steps: one panel; guidance: digits-FID and accuracy panels. Each draws its first series.
    for key, panels in (("steps_plot", 1), ("guidance_plot", 2)):
        size, pixels = _pixels(paths[key])
        assert size == (640 * panels, 420)
        for k in range(panels):
            assert _has(pixels[:, 640 * k : 640 * (k + 1)], C0)
    _, steps = _pixels(paths["steps_plot"])
    assert _has(steps, C1)  # the second method's line


def test_sweep_markdown_tables():
    md = report.sweep_markdown(_sweep_result()).splitlines()
    assert md[0] == "| method | steps | N | fid | kid_mean | accuracy | sample s |"
    assert md[2] == "| ddim | 4 | 16 | 7 | 0.07 | 0.9 | 1.5 |"
    assert md[5] == "| test split (floor) | – | 360 | 1.8 | 0.01 | 0.99 | – |"
    assert md[7] == "| guidance scale | method | steps | N | fid | kid_mean | accuracy | sample s |"
    assert md[9:] == ["| 0 | ddim | 4 | 16 | 9 | 0.09 | 0.5 | 1.5 |", md[10]] and len(md) == 11


def test_sweep_charts_with_inception_score_and_no_floor(tmp_path):
    result = _sweep_result()
    result.update(dataset="cifar10", floor=None)
    for r in result["steps"] + result["guidance"]:
        r["metrics"].pop("accuracy")
        r["metrics"].update(inception_score=3.0 + r["guidance_scale"], inception_score_std=0.1)
    paths = report.write_sweep(result, str(tmp_path))
    size, _ = _pixels(paths["guidance_plot"])
    assert size == (2 * 640, 420)  # FID and Inception Score
    assert "inception_score" in open(paths["markdown"]).read()


def test_write_report(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (24, 8, 8, 1), np.uint8)
    result = {"method": "ddim", "metrics": {"fid": 1.0}}
    out, grid = report.write_report(result, imgs, str(tmp_path / "eval" / "r.json"))
    with open(out) as f:
        saved = json.load(f)
    assert saved == {**result, "grid": grid} and grid == str(tmp_path / "eval" / "r.png")
    with Image.open(grid) as im:  # 20 images in 2 rows of 10 tiles of 8 px enlarged 4x
        assert im.size == (10 * 33 + 1, 2 * 33 + 1)
        tiles = np.asarray(im)
    np.testing.assert_array_equal(tiles[34:66:4, 1:33:4], imgs[10, ..., 0])  # row 2, column 1


def test_plot_run(tmp_path):
    log = JsonLines(tmp_path / "metrics.jsonl")
    for step in range(1, 201):
        log.append({"step": step, "loss": 1.0 / step, "grad_norm": 1.0, "lr": 1e-3})
        if step % 50 == 0:
            log.append({"step": step, "digits_fid": 100.0 / step, "kid_std": 0.1})
    out = report.plot_run(tmp_path, tmp_path / "plots" / "run.png")
    assert out == str(tmp_path / "plots" / "run.png")
    size, pixels = _pixels(out)
    assert size == (800, 2 * 320)  # the loss panel and one digits_fid panel
    assert _has(pixels[:320], C0) and not _has(pixels[:320], C1)
    assert _has(pixels[320:], C1)

    # Only the loss: one panel.
    (tmp_path / "loss_only").mkdir()
    JsonLines(tmp_path / "loss_only" / "metrics.jsonl").append({"step": 1, "loss": 0.5})
    size, _ = _pixels(report.plot_run(tmp_path / "loss_only", tmp_path / "loss.png"))
    assert size == (800, 320)


def test_plot_run_without_metrics_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="metrics.jsonl"):
        report.plot_run(tmp_path, tmp_path / "run.png")
    assert not (tmp_path / "run.png").exists()
