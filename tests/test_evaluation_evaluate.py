"""Tests of ddpm_jax.evaluation.evaluate / .sweep and experiments/evaluate.py (8 CPU devices).

Three tiny runs are trained in-process: a class-conditional digits run (2 steps), a CIFAR-10 run
on ``tfds.testing.mock_data`` (1 step, 8x8 images) and a latent digits run (16x16 images through a
frozen autoencoder, prompts naming classes). The digits classifier is trained once. Known answers:
the test-split floor equals ``digits_metrics`` (an independent code path) of the test split
against the training split; the class accuracy equals the fraction of the classifier's
predictions that match the requested classes (a latent run's prompts mapped to the classes they
name); a tfds run is evaluated with its dataset unreadable once its reference is cached.
"""

import json
import os

import flax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from _helpers import random_params
from PIL import Image

from ddpm_jax import builders, config as config_lib, data, images, runs, tfds_source, train
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import (
    digits_classifier as digits_lib,
    evaluate as ev,
    reference,
    report,
    sweep,
)
from ddpm_jax.sample_settings import SampleSettings
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
    return runs.load_run(run_dir)


@pytest.fixture
def default_digits_extractor(classifier, monkeypatch):
    """The command line's default digits extractor is the module's classifier (trained once)."""
    monkeypatch.setattr(ev, "digits_extractor", lambda: reference.digits_extractor(classifier))


@pytest.fixture(scope="module")
def run_evaluator(loaded, classifier, tmp_path_factory):
    """One RunEvaluator for the module's tests: each sampling setting compiles once."""
    return sweep.RunEvaluator(
        loaded,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        extractor=reference.digits_extractor(classifier),
        kid_num_subsets=5,
        verbose=False,
    )


def loaded_settings(run_evaluator, **changes):
    return run_evaluator.run.sample_settings.replace(**changes)


def test_load_run(loaded):
    assert loaded.step == 2 and loaded.image_shape == (8, 8, 1)
    assert loaded.model.num_classes == 10 and loaded.dp.num_devices == 8


def test_evaluator_needs_no_run(classifier, tmp_path):
    """An Evaluator from a dataset name and an image shape: the test split scores as the floor,
    the cache is written once and read by the next Evaluator."""
    kw = dict(extractor=reference.digits_extractor(classifier), cache_dir=str(tmp_path))
    evaluator = ev.Evaluator("digits", (8, 8, 1), kid_num_subsets=2, verbose=False, **kw)
    assert not evaluator.reference_cached and os.path.exists(evaluator.cache_path)
    assert evaluator.reference.count == 1437
    test_images, test_labels = data.digits_arrays("test")
    scores = evaluator.score(test_images, test_labels)
    assert scores == evaluator.floor()["metrics"]
    assert set(evaluator.score(test_images)) == {"fid", "kid_mean", "kid_std"}  # no classes
    again = ev.Evaluator("digits", (8, 8, 1), verbose=False, **kw)
    assert again.reference_cached and again.cache_path == evaluator.cache_path
    with pytest.raises(ValueError, match="imgs of shape"):
        evaluator.score(images.resize(test_images, (16, 16)))
    with pytest.raises(UsageError, match="channels differ"):  # found when computing the cache
        ev.Evaluator(
            "digits", (8, 8, 3), extractor=kw["extractor"], cache_dir=str(tmp_path / "rgb")
        )


def test_evaluate_report_and_grid(run_evaluator, classifier, tmp_path):
    settings = loaded_settings(run_evaluator, method="ddim", num_steps=4, guidance_scale=2.0)
    result, imgs = run_evaluator.evaluate(settings, 24, seed=3)
    assert imgs.shape == (24, 8, 8, 1) and imgs.dtype == np.uint8
    assert set(result["metrics"]) == {"fid", "kid_mean", "kid_std", "accuracy"}
    for key in ("method", "num_steps", "guidance_scale", "num_samples", "timing", "reference"):
        assert key in result
    assert result["num_samples"] == 24 and result["checkpoint_step"] == 2
    labels = np.arange(24) % 10  # requested classes cycle
    assert result["metrics"]["accuracy"] == pytest.approx(
        float(np.mean(classifier.predict(imgs) == labels))
    )
    # Same seed, same images; the metrics equal digits_metrics' FID of these images.
    imgs2, labels2, _ = run_evaluator.sample(settings, 24, seed=3)
    np.testing.assert_array_equal(imgs, imgs2)
    np.testing.assert_array_equal(labels2, labels)
    ref = digits_lib.digits_metrics(classifier, imgs, labels, kid_num_subsets=2)
    assert result["metrics"]["fid"] == pytest.approx(ref["fid"], rel=1e-6)

    out, grid = report.write_report(result, imgs, str(tmp_path / "eval" / "r.json"))
    with open(out) as f:
        saved = json.load(f)
    assert saved["metrics"] == result["metrics"] and saved["grid"] == grid
    with Image.open(grid) as im:  # 20 images in 2 rows of 10 tiles of 8 px enlarged 4x
        assert im.size == (10 * 33 + 1, 2 * 33 + 1)


def test_floor_matches_digits_metrics(run_evaluator, classifier):
    floor = run_evaluator.evaluator.floor()
    test_images, test_labels = data.digits_arrays("test")
    ref = digits_lib.digits_metrics(classifier, test_images, test_labels, kid_num_subsets=2)
    assert floor["num_images"] == 360
    assert floor["metrics"]["fid"] == pytest.approx(ref["fid"], rel=1e-6)
    assert floor["metrics"]["accuracy"] == pytest.approx(ref["accuracy"])


def test_sweep(run_evaluator, tmp_path, capsys):
    settings = loaded_settings(run_evaluator, method="ddim", num_steps=4, guidance_scale=2.0)
    result = sweep.sweep(
        run_evaluator,
        settings,
        steps={"ddim": [4], "dpmpp_2m": [3]},
        guidance_scales=[0.0, 2.0],
        num_samples=16,
        num_samples_for=lambda m, n: 8 if m == "dpmpp_2m" else 16,
    )
    assert capsys.readouterr().out == ""  # verbose=False
    assert [(r["method"], r["num_steps"], r["num_samples"]) for r in result["steps"]] == [
        ("ddim", 4, 16),
        ("dpmpp_2m", 3, 8),
    ]
    assert [r["guidance_scale"] for r in result["guidance"]] == [0.0, 2.0]
    assert result["floor"]["num_images"] == 360
    assert (result["num_timesteps"], result["checkpoint_step"]) == (T, 2)
    # The same setting in both sweeps, and evaluated directly, gives the same metrics.
    assert result["steps"][0]["metrics"] == result["guidance"][1]["metrics"]
    direct, _ = run_evaluator.evaluate(settings, 16)
    assert result["guidance"][1]["metrics"] == direct["metrics"]
    paths = report.write_sweep(result, str(tmp_path / "sweep"))
    with open(paths["json"]) as f:
        assert json.load(f)["steps"][1]["method"] == "dpmpp_2m"


def test_parse_steps_spec():
    spec = sweep.parse_steps_spec("ddpm:full; ddim:10,20", 1000)
    assert spec == {"ddpm": [1000], "ddim": [10, 20]}
    for bad in ("", "euler:10", "ddim:", "ddim:ten"):
        with pytest.raises(ValueError, match="sweep_steps"):
            sweep.parse_steps_spec(bad, 1000)


def test_sample_settings_check_names_the_field():
    ok = SampleSettings(method="ddim", num_steps=4)
    assert ok.check(T) is ok and ok.replace(num_steps=T + 1).check(None)
    for field, value in (
        ("method", "euler"),
        ("num_steps", 1),
        ("num_steps", T + 1),
        ("num_steps", 2.5),
        ("guidance_scale", -1.0),
        ("eta", -0.5),
        ("clip_x0", 0.0),
        ("variance", "learned"),
        ("spacing", "cubic"),
        ("batch_size", 0),
    ):
        with pytest.raises(UsageError, match=f"^--{field}="):
            ok.replace(**{field: value}).check(T, prefix="--")


# ----------------------------------------------------------------------------- the command line


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors(run_dir, tmp_path, capsys):
    assert "exactly one of --workdir" in _cli_error([], capsys)
    assert "does not exist" in _cli_error([f"--workdir={tmp_path / 'none'}"], capsys)
    assert "no readable config.json" in _cli_error([f"--workdir={tmp_path}"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    with open(os.path.join(run_dir, "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    assert "no checkpoint" in _cli_error([f"--workdir={empty}"], capsys)
    assert "method='euler'" in _cli_error([f"--workdir={run_dir}", "--method=euler"], capsys)
    assert "num_steps=50" in _cli_error([f"--workdir={run_dir}", "--num_steps=50"], capsys)
    assert "bad command line" in _cli_error([f"--workdir={run_dir}", "--num_steps=x"], capsys)
    assert "positional" in _cli_error([f"--workdir={run_dir}", "extra"], capsys)
    assert "--sweep_steps='ddim:100'" in _cli_error(
        [f"--workdir={run_dir}", "--sweep", "--sweep_steps=ddim:100"], capsys
    )
    assert "sweep_guidance='a'" in _cli_error(
        [f"--workdir={run_dir}", "--sweep", "--sweep_guidance=a"], capsys
    )


def test_cli_writes_report(run_dir, tmp_path, capsys, default_digits_extractor):
    result = cli.main(
        [
            "evaluate",
            f"--workdir={run_dir}",
            "--num_samples=16",
            f"--cache_dir={tmp_path}",
            "--kid_num_subsets=2",
        ]
    )
    assert (result["method"], result["num_steps"], result["guidance_scale"]) == ("ddim", 4, 2.0)
    out = os.path.join(run_dir, "eval", "ddim_4_g2_n16_seed0.json")
    assert os.path.exists(out) and os.path.exists(out[:-5] + ".png")
    printed = capsys.readouterr().out
    assert "batch 1/1" in printed and "images/s" in printed


def test_cli_sweep(run_dir, tmp_path, capsys, default_digits_extractor):
    out = tmp_path / "sweep"
    result = cli.main(
        [
            "evaluate",
            f"--workdir={run_dir}",
            "--sweep",
            "--sweep_steps=ddim:4",
            "--sweep_guidance=2",
            "--num_samples=8",
            f"--cache_dir={tmp_path}",
            "--kid_num_subsets=2",
            f"--out={out}",
        ]
    )
    assert [(r["method"], r["num_steps"], r["num_samples"]) for r in result["steps"]] == [
        ("ddim", 4, 8)
    ]
    assert result["steps"][0]["metrics"] == result["guidance"][0]["metrics"]
    assert result["floor"]["num_images"] == 360
    assert sorted(os.listdir(out)) == [
        "sweep.json",
        "sweep.md",
        "sweep_guidance.png",
        "sweep_steps.png",
    ]
    printed = capsys.readouterr().out
    assert report.sweep_markdown(result) in printed and "wrote " in printed


def _moments_extractor():
    """A cheap stand-in for the Inception network: per-channel means and standard deviations,
    and probabilities over 4 'classes' from a fixed linear map of them."""
    w = np.random.default_rng(0).standard_normal((6, 4))

    def fn(x):
        x = np.asarray(x, np.float64) / 255.0
        feats = np.concatenate([x.mean((1, 2)), x.std((1, 2))], -1)
        logits = feats @ w
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return feats.astype(np.float32), probs / probs.sum(-1, keepdims=True)

    return reference.Extractor("moments", 6, fn, classes=False)


def _tiny_tfds_config(data_dir):
    from experiments import cifar

    c = cifar.get_config()
    c.data.data_dir = data_dir
    c.data.image_size = 8
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.num_groups = 4
    c.model.dropout = 0.0
    c.diffusion.num_timesteps = T
    c.train.num_steps = 1
    c.train.batch_size = 8
    c.train.warmup_steps = 0
    c.train.checkpoint_every = 1
    c.train.sample_every = 0
    c.train.steps_per_call = 1
    c.sample.num_samples = 0
    c.sample.grid_size = 0
    c.sample.method = "ddim"
    c.sample.num_steps = 2
    c.sample.batch_size = 8
    return c


def test_cli_evaluates_a_tfds_run_without_its_data(tmp_path, monkeypatch, capsys):
    """A CIFAR-10 run is evaluated where CIFAR-10 is not prepared: the run loads from its config
    and the reference statistics from the cache; reading the dataset would fail the test."""
    data_dir, cache, workdir = (str(tmp_path / d) for d in ("tfds", "cache", "run"))
    with tfds.testing.mock_data(num_examples=20), monkeypatch.context() as mock:
        mock.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        train.run(_tiny_tfds_config(data_dir), workdir)
        cached = ev.Evaluator(
            "cifar10",
            (8, 8, 3),
            data_dir=data_dir,
            extractor=_moments_extractor(),
            cache_dir=cache,
            verbose=False,
        )
    assert not cached.reference_cached and cached.reference.count == 20
    assert not tfds.builder("cifar10", data_dir=data_dir).is_prepared()

    def unreadable(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(data, "make_dataset", unreadable)
    monkeypatch.setattr(data, "load_tfds_source", unreadable)
    monkeypatch.setattr(tfds_source, "load_tfds_source", unreadable)
    monkeypatch.setattr(ev, "inception_extractor", lambda path: _moments_extractor())
    capsys.readouterr()
    result = cli.main(
        ["evaluate", f"--workdir={workdir}", "--num_samples=4", f"--cache_dir={cache}"]
    )
    assert "reference statistics (20 images) loaded" in capsys.readouterr().out
    assert result["reference"] == {"path": cached.cache_path, "count": 20, "from_cache": True}
    assert (result["dataset"], result["extractor"], result["checkpoint_step"]) == (
        "cifar10",
        "moments",
        1,
    )
    assert set(result["metrics"]) == {
        "fid",
        "kid_mean",
        "kid_std",
        "inception_score",
        "inception_score_std",
    }
    assert all(np.isfinite(v) for v in result["metrics"].values())
    grid = os.path.join(workdir, "eval", "ddim_2_g1_n4_seed0.png")
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size == (4 * 65 + 1, 65 + 1)  # 8 px cells enlarged 8x


# ----------------------------------------------------------------------------- a latent run


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """A tiny latent digits run (16x16 images, 8x8x4 latents, the experiment's 40 prompts)
    trained with the experiment's pipeline (``latent_digits.run`` without its prompt grids and
    metrics) on 128 training digits."""
    from ddpm_jax.latent import frozen_vae, pipeline, prompts
    from experiments import latent_digits

    c = latent_digits.get_config()
    c.latent.image_size = 16
    c.latent.vae_block_out_channels = (8, 8)
    c.latent.vae_norm_num_groups = 4
    c.latent.text_width = 8
    c.latent.text_num_heads = 2
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.model.num_groups = 4
    c.train.num_steps = 2
    c.train.batch_size = 16
    c.train.checkpoint_every = 2
    c.train.steps_per_call = 2
    c.sample.num_steps = 3
    c.sample.batch_size = 24
    workdir = tmp_path_factory.mktemp("latent") / "run"
    # A random frozen autoencoder in place of a trained one (the experiment reuses an existing
    # vae.msgpack, as on resume): this skips compiling the autoencoder's training step.
    vae = builders.build_vae(c, 1)
    vae_params = random_params(vae, jnp.zeros((1, 16, 16, 1)), sample_posterior=False)
    workdir.mkdir()
    (workdir / frozen_vae.VAE_FILE).write_bytes(flax.serialization.to_bytes(vae_params))
    train_prompts, prompt_class = prompts.class_prompts(
        latent_digits.TEMPLATES, latent_digits.NAMES
    )
    x, y = data.digits_arrays("train")
    pipeline.train_latent(
        c, str(workdir), x[:128], y[:128], train_prompts, prompt_class, log=lambda message: None
    )
    return str(workdir), prompt_class


def test_cli_evaluates_a_latent_run(
    latent_dir, classifier, tmp_path, monkeypatch, capsys, default_digits_extractor
):
    """16x16 samples against the digits resized to 16x16; the accuracy compares the classifier's
    predictions (of the samples resized to 8x8) with the classes the sampled prompts name."""
    workdir, prompt_class = latent_dir
    seen = {}
    score = ev.Evaluator.score

    def spy(self, imgs, classes=None):
        seen.update(imgs=imgs, classes=classes)
        return score(self, imgs, classes)

    monkeypatch.setattr(ev.Evaluator, "score", spy)
    result = cli.main(
        [
            "evaluate",
            f"--workdir={workdir}",
            "--num_samples=20",
            "--num_steps=3",
            f"--cache_dir={tmp_path}",
            "--kid_num_subsets=2",
        ]
    )
    assert result["method"] == "dpmpp_2m" and result["guidance_scale"] == 3.0
    imgs, classes = seen["imgs"], seen["classes"]
    assert imgs.shape == (20, 16, 16, 1) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(classes, prompt_class[np.arange(20)])  # prompts 0..19
    assert not np.array_equal(classes, np.arange(20))  # the labels were prompt ids, not classes
    small = images.resize(imgs, (8, 8))
    assert result["metrics"]["accuracy"] == pytest.approx(
        float(np.mean(classifier.predict(small) == classes))
    )

    # The reference: the training digits at 16x16, features of their 8x8 resizes.
    path = result["reference"]["path"]
    assert os.path.basename(path).startswith("digits_16x16_train_digits_cnn-")
    train_16 = images.resize(data.digits_arrays("train")[0], (16, 16))
    feats = np.asarray(classifier.features(images.resize(train_16, (8, 8))), np.float64)
    with np.load(path) as f:
        assert int(f["count"]) == 1437
        np.testing.assert_allclose(f["mu"], feats.mean(0), rtol=1e-10, atol=1e-10)
    grid = os.path.join(workdir, "eval", "dpmpp_2m_3_g3_n20_seed0.png")
    with Image.open(grid) as im:  # 20 samples of 16 px in 2 rows of 10, enlarged 2x
        assert im.mode == "L" and im.size == (10 * 33 + 1, 2 * 33 + 1)
