"""Tests of ddpm_jax.evaluate and experiments/evaluate.py on a tiny digits run (8 CPU devices).

One tiny class-conditional run (2 training steps) is trained in-process; the digits classifier
is trained once. Known answers: the cached reference statistics equal the float64 mean and
covariance (np.cov) of the classifier's features of the training split; the test-split floor
equals ``digits_metrics`` (an independent code path) of the test split against the training
split; the class accuracy equals the fraction of predictions that match the requested labels.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import config as config_lib
from ddpm_jax import data, metrics, train
from ddpm_jax import digits_classifier as digits_lib
from ddpm_jax import evaluate as ev
from experiments import evaluate as cli

T = 20


def _tiny_config():
    c = config_lib.default_config()
    c.data.name = "digits"
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.dropout = 0.0
    c.model.num_groups = 4
    c.model.class_conditional = True
    c.diffusion.num_timesteps = T
    c.train.num_steps = 2
    c.train.batch_size = 8
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_every = 0
    c.sample.num_samples = 0
    c.sample.grid_size = 0
    c.sample.method = "ddim"
    c.sample.num_steps = 4
    c.sample.guidance_scale = 2.0
    c.sample.batch_size = 16
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.run(_tiny_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def classifier():
    return digits_lib.train_digits_classifier(seed=0, epochs=3)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return train.load_run(run_dir)


def _evaluator(loaded, classifier, cache_dir):
    return ev.Evaluator(
        loaded,
        cache_dir=str(cache_dir),
        extractor=ev.digits_extractor(classifier),
        kid_num_subsets=5,
        verbose=False,
    )


def test_load_run(loaded):
    assert loaded.step == 2 and loaded.image_shape == (8, 8, 1)
    assert loaded.model.num_classes == 10 and loaded.dp.num_devices == 8


def test_reference_stats_cached_and_exact(loaded, classifier, tmp_path):
    evaluator = _evaluator(loaded, classifier, tmp_path)
    assert not evaluator.reference_cached and os.path.exists(evaluator.cache_path)
    train_images, _ = data.digits_arrays("train")
    feats = np.asarray(classifier.features(train_images), np.float64)
    with np.load(evaluator.cache_path) as f:
        assert int(f["count"]) == 1437
        assert str(f["extractor"]) == evaluator.extractor.name
        np.testing.assert_allclose(f["mu"], feats.mean(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(f["sigma"], np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)
        direct = metrics.RunningStats.init(feats.shape[1]).update(feats).mean_cov()
        np.testing.assert_allclose(f["sigma"], direct[1], rtol=1e-10, atol=1e-12)

    # A second evaluator loads the file: the data batches are never read again.
    def no_batches():
        raise AssertionError("reference statistics recomputed")

    stats, cached = ev.reference_stats(evaluator.extractor, no_batches, evaluator.cache_path)
    assert cached and stats.count == 1437
    np.testing.assert_array_equal(stats.cov, evaluator.reference.cov)
    again = _evaluator(loaded, classifier, tmp_path)
    assert again.reference_cached

    # Another classifier (another name) does not reuse the cache.
    other = ev.Extractor("other", 128, evaluator.extractor.fn, True)
    _, cached = ev.reference_stats(other, lambda: data_batches(), evaluator.cache_path)
    assert not cached


def data_batches():
    yield data.digits_arrays("train")


def test_evaluate_report_and_grid(loaded, classifier, tmp_path):
    evaluator = _evaluator(loaded, classifier, tmp_path / "cache")
    kw = dict(method="ddim", num_steps=4, guidance_scale=2.0, num_samples=24, seed=3)
    report, imgs = evaluator.evaluate(**kw)
    assert imgs.shape == (24, 8, 8, 1) and imgs.dtype == np.uint8
    assert set(report["metrics"]) == {"fid", "kid_mean", "kid_std", "accuracy"}
    for key in ("method", "num_steps", "guidance_scale", "num_samples", "timing", "reference"):
        assert key in report
    assert report["num_samples"] == 24 and report["checkpoint_step"] == 2
    labels = np.arange(24) % 10  # requested classes cycle
    assert report["metrics"]["accuracy"] == pytest.approx(
        float(np.mean(classifier.predict(imgs) == labels))
    )
    # Same seed, same images; the metrics equal digits_metrics' FID of these images.
    imgs2, _, _ = evaluator.sample(**kw)
    np.testing.assert_array_equal(imgs, imgs2)
    ref = digits_lib.digits_metrics(classifier, imgs, labels, kid_num_subsets=2)
    assert report["metrics"]["fid"] == pytest.approx(ref["fid"], rel=1e-6)

    out, grid = ev.write_report(report, imgs, str(tmp_path / "eval" / "r.json"))
    with open(out) as f:
        saved = json.load(f)
    assert saved["metrics"] == report["metrics"] and saved["grid"] == grid
    with Image.open(grid) as im:  # 20 images in 2 rows of 10 tiles of 8 px, 1 px padding
        assert im.size == (10 * 9 + 1, 2 * 9 + 1)


def test_floor_matches_digits_metrics(loaded, classifier, tmp_path):
    floor = _evaluator(loaded, classifier, tmp_path).floor()
    test_images, test_labels = data.digits_arrays("test")
    ref = digits_lib.digits_metrics(classifier, test_images, test_labels, kid_num_subsets=2)
    assert floor["num_images"] == 360
    assert floor["metrics"]["fid"] == pytest.approx(ref["fid"], rel=1e-6)
    assert floor["metrics"]["accuracy"] == pytest.approx(ref["accuracy"])


def test_sweep_outputs(loaded, classifier, tmp_path):
    evaluator = _evaluator(loaded, classifier, tmp_path)
    result = ev.sweep(
        evaluator,
        steps={"ddim": [4], "dpmpp_2m": [3]},
        guidance_scales=[0.0, 2.0],
        guidance_scale=2.0,
        method="ddim",
        num_steps=4,
        num_samples=16,
        num_samples_for=lambda m, n: 8 if m == "dpmpp_2m" else 16,
    )
    assert [(r["method"], r["num_steps"], r["num_samples"]) for r in result["steps"]] == [
        ("ddim", 4, 16),
        ("dpmpp_2m", 3, 8),
    ]
    assert [r["guidance_scale"] for r in result["guidance"]] == [0.0, 2.0]
    assert result["floor"]["num_images"] == 360
    # The same setting in both sweeps, and evaluated directly, gives the same metrics.
    assert result["steps"][0]["metrics"] == result["guidance"][1]["metrics"]
    direct, _ = evaluator.evaluate(method="ddim", num_steps=4, guidance_scale=2.0, num_samples=16)
    assert result["guidance"][1]["metrics"] == direct["metrics"]
    paths = ev.write_sweep(result, str(tmp_path / "sweep"))
    with open(paths["json"]) as f:
        assert json.load(f)["steps"][1]["method"] == "dpmpp_2m"
    md = open(paths["markdown"]).read()
    assert "| ddim | 4 | 16 |" in md and "test split (floor)" in md and "accuracy" in md
    # Steps: one panel; guidance: digits-FID and accuracy panels. Each draws its first series.
    for key, panels in (("steps_plot", 1), ("guidance_plot", 2)):
        with Image.open(paths[key]) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert im.size == (640 * panels, 420)
        for k in range(panels):
            panel = pixels[:, 640 * k : 640 * (k + 1)]
            assert np.any(np.all(panel == (31, 119, 180), axis=-1))


def test_parse_steps_spec():
    assert ev.parse_steps_spec("ddpm:full; ddim:10,20", 1000) == {"ddpm": [1000], "ddim": [10, 20]}
    for bad in ("", "euler:10", "ddim:", "ddim:ten"):
        with pytest.raises(ValueError, match="sweep_steps"):
            ev.parse_steps_spec(bad, 1000)


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors(run_dir, tmp_path, capsys):
    assert "does not exist" in _cli_error([f"--workdir={tmp_path / 'none'}"], capsys)
    assert "no config.json" in _cli_error([f"--workdir={tmp_path}"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    with open(os.path.join(run_dir, "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    assert "no checkpoint" in _cli_error([f"--workdir={empty}"], capsys)
    assert "method='euler'" in _cli_error([f"--workdir={run_dir}", "--method=euler"], capsys)
    assert "num_steps=50" in _cli_error([f"--workdir={run_dir}", "--num_steps=50"], capsys)
    assert "bad command line" in _cli_error([f"--workdir={run_dir}", "--num_steps=x"], capsys)
    assert "--sweep_steps='ddim:100'" in _cli_error(
        [f"--workdir={run_dir}", "--sweep", "--sweep_steps=ddim:100"], capsys
    )


def test_cli_writes_report(run_dir, tmp_path, capsys):
    report = cli.main(
        [
            "evaluate",
            f"--workdir={run_dir}",
            "--num_samples=16",
            f"--cache_dir={tmp_path}",
            "--kid_num_subsets=2",
        ]
    )
    assert (report["method"], report["num_steps"], report["guidance_scale"]) == ("ddim", 4, 2.0)
    out = os.path.join(run_dir, "eval", "ddim_4_g2_n16_seed0.json")
    assert os.path.exists(out) and os.path.exists(out[:-5] + ".png")
    printed = capsys.readouterr().out
    assert "batch 1/1" in printed and "images/s" in printed


def test_missing_inception_weights_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="inception_path="):
        ev.inception_extractor(str(tmp_path / "missing.pth"))
