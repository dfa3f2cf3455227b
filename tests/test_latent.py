"""Latent diffusion (``ddpm_jax.latent``): frozen VAE, latent scaling, the prompt-conditioned UNet
(``ddpm_jax.models.text.PromptUNet``), sampling from prompts and the latent experiments' CLI."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import builders, data, guidance, images, runs, samplers, schedules, state as state_lib
from ddpm_jax.latent import frozen_vae, prompts
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.text import PAD_ID, PromptUNet, TextEncoder, Tokenizer, prompt_table
from ddpm_jax.models.unet import UNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a handwritten zero", "the digit 0", "a handwritten one", "the digit 1"]
PROMPT_CLASS = np.array([0, 0, 1, 1], np.int32)


def _vae():
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )


def _digits32(n=12):
    imgs, labels = data.digits_arrays("train")
    return images.resize(imgs[:n], (32, 32)), labels[:n]


def _model(tokenizer):
    unet = UNet(
        ch=8,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(),  # the middle block still cross-attends to the prompt
        context_dim=8,
        num_heads=1,
        num_groups=4,
    )
    text = TextEncoder(vocab_size=tokenizer.vocab_size, max_length=4, width=8, depth=1, num_heads=2)
    return PromptUNet(unet=unet, text=text, prompt_tokens=prompt_table(tokenizer, PROMPTS))


@pytest.fixture(scope="module")
def vae_setup():
    vae = _vae()
    imgs, labels = _digits32()
    x = imgs.astype(np.float32) / 127.5 - 1.0
    params = jax.jit(lambda k: vae.init(k, x[:1], sample_posterior=False))(jax.random.key(0))
    return vae, params, x, labels


@pytest.fixture(scope="module")
def model_setup():
    tok = Tokenizer.from_prompts(PROMPTS, max_length=4)
    model = _model(tok)
    x = jnp.zeros((1, 8, 8, 4))
    y = jnp.zeros((1,), jnp.int32)
    variables = jax.jit(lambda k: model.init(k, x, y, y))(jax.random.key(1))
    # conv_out is zero-initialised (the output would ignore everything): perturb all weights.
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(2)
    leaves = [
        np.asarray(a) + np.float32(0.3) * rng.standard_normal(a.shape, np.float32) for a in leaves
    ]
    return tok, model, jax.tree.unflatten(treedef, leaves)


def test_latent_shapes_and_scale_factor(vae_setup):
    vae, params, x, _ = vae_setup
    latents, scale = frozen_vae.encode_latents(vae, params, x, batch_size=5)
    assert latents.shape == (len(x), 8, 8, 4) and latents.dtype == np.float32
    mean, _ = jax.jit(lambda v: vae.apply(params, v, method=AutoencoderKL.encode))(x)
    mean = np.asarray(mean, np.float64)
    np.testing.assert_allclose(scale, 1.0 / mean.std(), rtol=1e-5)
    np.testing.assert_allclose(latents, mean * scale, rtol=1e-5, atol=1e-5)  # batch sizes differ
    np.testing.assert_allclose(latents.std(), 1.0, rtol=1e-4)
    # A given scale factor is used as is; the decoder inverts the scaling.
    latents2, scale2 = frozen_vae.encode_latents(vae, params, x, scale_factor=2.0)
    assert scale2 == 2.0
    np.testing.assert_allclose(latents2, mean * 2.0, rtol=1e-5, atol=1e-6)
    decode = frozen_vae.make_decode_fn(vae, params, scale)
    direct = jax.jit(lambda z: vae.apply(params, z, method=AutoencoderKL.decode))(
        jnp.asarray(mean, jnp.float32)
    )
    np.testing.assert_allclose(jax.jit(decode)(latents), np.clip(direct, -1, 1), atol=1e-5)


def test_null_prompt_is_the_empty_prompt(model_setup):
    tok, model, variables = model_setup
    assert model.num_prompts == model.null_label == len(PROMPTS)
    table = np.asarray(model.prompt_tokens)
    assert table.shape == (len(PROMPTS) + 1, 4)
    np.testing.assert_array_equal(table[-1], PAD_ID)
    np.testing.assert_array_equal(table[:-1], tok.encode(PROMPTS)[0])
    y = jnp.array([len(PROMPTS), 2])
    np.testing.assert_array_equal(model.tokens_of(y), np.stack([table[-1], table[2]]))
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    t = jnp.array([10, 500])
    out_ids = jax.jit(model.apply)(variables, x, t, y)
    empty_and_prompt = tok.encode(["", PROMPTS[2]])[0]
    from_tokens = jax.jit(lambda *a: model.apply(*a, method=PromptUNet.from_tokens))
    out_tokens = from_tokens(variables, x, t, empty_and_prompt)
    np.testing.assert_allclose(out_ids, out_tokens, rtol=1e-5, atol=1e-6)


def test_changing_the_prompt_changes_the_output(model_setup):
    tok, model, variables = model_setup
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(4), (1, 8, 8, 4)), (5, 8, 8, 4))
    t = jnp.full((5,), 300)
    out = np.asarray(jax.jit(model.apply)(variables, x, t, jnp.arange(5)))
    for i in range(5):
        for j in range(i):
            assert np.abs(out[i] - out[j]).max() > 1e-3, (i, j)
    # A new phrasing of known words is a different prompt too; the same prompt is deterministic.
    new = tok.encode(["the digit zero", "the digit zero"])[0]
    from_tokens = jax.jit(lambda *a: model.apply(*a, method=PromptUNet.from_tokens))
    out_new = np.asarray(from_tokens(variables, x[:2], t[:2], new))
    np.testing.assert_array_equal(out_new[0], out_new[1])
    assert np.abs(out_new[0] - out[0]).max() > 1e-3


def test_prompt_table_rejects_prompts_that_encode_to_nothing():
    tok = Tokenizer.from_prompts(PROMPTS, max_length=4)
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_table(tok, ["a handwritten zero", "!!"])


@pytest.mark.slow
def test_frozen_vae_receives_no_updates(vae_setup, model_setup):
    vae, vae_params, x, labels = vae_setup
    _, model, variables = model_setup
    before = jax.tree.map(lambda a: np.array(a, copy=True), vae_params)
    latents, scale = frozen_vae.encode_latents(vae, vae_params, x)
    prompt_ids = np.array([2 * (c % 2) + (i % 2) for i, c in enumerate(labels)], np.int32)
    optimizer = optax.adam(1e-2)
    state = state_lib.create_train_state(variables, optimizer)
    assert set(state.params["params"]) == {"unet", "text"}  # no VAE parameter to optimise
    step_fn = state_lib.make_train_step(
        lambda p, x_t, t, y=None, rng=None, example_index=None: model.apply(
            p, x_t, t, y, train=True
        ),
        schedules.get("cosine", 100),
        optimizer,
        state_lib.StepSettings(seed=0, global_batch_size=len(latents), p_uncond=0.25),
        map_grads=state_lib.pmean_grads("data"),
        null_label=model.null_label,
    )
    step = jax.jit(jax.vmap(step_fn, axis_name="data"))
    stacked = jax.tree.map(lambda a: a[None], state)
    batch = {
        "image": latents[None],
        "label": prompt_ids[None],
        "index": np.arange(len(latents), dtype=np.int32)[None],
    }
    decode = jax.jit(frozen_vae.make_decode_fn(vae, vae_params, scale))
    for _ in range(3):
        stacked, metrics = step(stacked, batch)
        decode(latents[:2])  # sampling-time decoding between steps uses the VAE read-only
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a[0]), np.asarray(b)),
        stacked.params,
        state.params,
    )
    assert all(jax.tree.leaves(moved["params"]["unet"]["conv_out"]))  # the UNet trained
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), vae_params, before)
    assert all(jax.tree.leaves(same))
    # Gradients cannot reach the VAE through the decoder used at sampling time.
    loss = lambda p: jnp.sum(frozen_vae.make_decode_fn(vae, p, scale)(latents[:2]))
    g = jax.jit(jax.grad(loss))(vae_params)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))


@pytest.mark.parametrize("delta", [0.0, 0.05])
def test_latent_digits_sampling_recipe_tolerates_an_imperfect_network(delta):
    """The digits recipe's schedule, prediction target, sampler and guidance on N(0, I) latents.

    For N(0, I) data the exact predictions are known (x0 = sqrt(ab) x_t, eps = sqrt(1-ab) x_t,
    v = 0); the network is exact plus a fixed error of size ``delta`` (different for the prompt and
    the null prompt), guided as configured. Samples must keep std ~1. Regression: with eps on the
    cosine schedule, DPM-Solver++'s log-SNR grid starts at alpha_bar = 2.4e-9, where
    x0 = (x - sigma eps) / alpha amplifies the error by up to 2e4: std 6.7 at delta = 0.05.
    """
    from experiments import latent_digits

    config = latent_digits.get_config()
    s, d = config.sample, config.diffusion
    schedule = builders.build_schedule(config)
    shape = (256, 8, 8, 4)
    errors = delta * jax.random.normal(jax.random.key(1), (2, *shape[1:]))

    def model_fn(x, t, y):
        a = schedule.sqrt_alpha_bars[t][:, None, None, None]
        sigma = schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        exact = {"eps": sigma * x, "x0": a * x, "v": jnp.zeros_like(x)}[d.prediction]
        return exact + errors[y]

    guided = guidance.classifier_free(model_fn, s.guidance_scale, null_label=1)
    cond = jnp.zeros((shape[0],), jnp.int32)
    z = jax.jit(
        lambda key: samplers.sample(
            lambda x, t: guided(x, t, y=cond),
            schedule,
            key,
            shape,
            method=s.method,
            num_steps=s.num_steps,
            prediction=d.prediction,
            clip_x0=s.clip_x0,
        )
    )(jax.random.key(0))
    assert 0.9 < float(jnp.std(z)) < 1.15


@pytest.mark.parametrize(
    "flag, field",
    [
        ("--config.latent.text_num_heads=3", "text_num_heads"),
        ("--config.sample.num_samples=8", "num_samples"),
        ("--config.latent.image_size=30", "image_size"),
        ("--allow_change=latent.vae_steps", "latent.vae_steps fixes what the run is"),
    ],
)
def test_latent_cli_reports_a_bad_config_in_one_line(tmp_path, capsys, flag, field):
    from experiments import latent_digits

    with pytest.raises(SystemExit) as exit_info:
        latent_digits.main(["latent_digits", f"--workdir={tmp_path / 'run'}", flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not (tmp_path / "run").exists()  # nothing was started


# ----------------------------------------------------------------------------- end to end


def _tiny_latent_flags(workdir):
    return [
        "latent_digits",
        f"--workdir={workdir}",
        "--config.latent.image_size=16",
        "--config.latent.vae_block_out_channels=(8,8)",
        "--config.latent.vae_norm_num_groups=4",
        "--config.latent.vae_steps=10",
        "--config.latent.vae_batch_size=16",
        "--config.latent.text_width=8",
        "--config.latent.text_num_heads=2",
        "--config.latent.samples_per_prompt=2",
        "--config.model.ch=8",
        "--config.model.ch_mult=(1,)",
        "--config.model.attn_resolutions=()",
        "--config.model.num_groups=4",
        "--config.train.num_steps=4",
        "--config.train.batch_size=16",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=2",
        "--config.train.steps_per_call=2",
        "--config.sample.num_steps=3",
    ]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    from experiments import latent_digits

    workdir = tmp_path_factory.mktemp("latent") / "run"
    metrics = latent_digits.main(_tiny_latent_flags(workdir))
    return workdir, metrics


def test_latent_digits_end_to_end(latent_run):
    """The whole experiment on a tiny configuration: VAE phase, encoding, diffusion phase, prompt
    samples and every output file."""
    from experiments import latent_digits

    workdir, metrics = latent_run
    info = json.loads((workdir / "latent.json").read_text())
    train_prompts, prompt_class = prompts.class_prompts(
        latent_digits.TEMPLATES, latent_digits.NAMES
    )
    assert info["prompts"] == train_prompts and info["prompt_classes"] == prompt_class.tolist()
    assert info["image_shape"] == [16, 16, 1] and info["latent_shape"] == [8, 8, 4]
    assert (workdir / "vae.msgpack").exists()
    with np.load(workdir / "samples.npz") as f:
        assert f["images"].shape == (2 * len(train_prompts), 16, 16, 1)
        np.testing.assert_array_equal(f["labels"], np.tile(prompt_class, 2))  # prompt i % P
    heldout, _ = prompts.class_prompts(latent_digits.HELDOUT_TEMPLATES, latent_digits.NAMES)
    assert len(list((workdir / "prompts").iterdir())) == len(train_prompts) + len(heldout)
    saved = json.loads((workdir / "latent_metrics.json").read_text())
    assert saved["train_steps"] == 4 and 0 <= saved["class_accuracy_train_prompts"] <= 1
    assert metrics["train_steps"] == 4


@pytest.mark.slow
def test_latent_run_resumes_with_the_trained_vae_and_loads_for_sampling(latent_run, capsys):
    from experiments import latent_digits

    workdir, metrics = latent_run
    outputs = ("vae.msgpack", "samples.npz", "latent_metrics.json")
    before = {name: (workdir / name).stat().st_mtime_ns for name in outputs}
    again = latent_digits.main(_tiny_latent_flags(workdir))  # the same command, run finished
    out = capsys.readouterr().out
    assert "loaded the frozen autoencoder" in out and "training already finished" in out
    assert "already finished: samples and metrics" in out
    assert {name: (workdir / name).stat().st_mtime_ns for name in outputs} == before
    assert again == json.loads(json.dumps(metrics))  # the saved metrics

    run = runs.load_run(workdir)  # from config.json, latent.json and vae.msgpack alone
    assert run.step == 4 and run.image_shape == (8, 8, 4) and run.decode_fn is not None
    settings = run.sample_settings.replace(num_steps=3, batch_size=8)
    imgs, labels = run.generator(settings)(run.ema_params, jax.random.key(0), 4)
    assert imgs.shape == (4, 16, 16, 1) and imgs.dtype == np.uint8
    info = json.loads((workdir / "latent.json").read_text())
    np.testing.assert_array_equal(run.classes_of(labels), np.asarray(info["prompt_classes"])[:4])


@pytest.mark.parametrize("devices", [1, 3])
def test_experiments_sample_reproduces_a_latent_runs_samples(
    latent_run, cache_dir, devices, tmp_path
):
    """``experiments.sample --workdir=<latent run>`` with the run's settings draws its
    ``samples.npz`` again, bit for bit, on 1 and on 3 devices (the run sampled on 8)."""
    import _worker_runs as wr

    workdir, _ = latent_run
    with np.load(workdir / "samples.npz") as f:
        want, want_labels = f["images"], f["labels"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}"]
    cmd += [f"--num_samples={len(want)}", f"--out={out}"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=wr.env(cache_dir, devices), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({devices} devices)" in proc.stdout
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], want)
        np.testing.assert_array_equal(f["labels"], want_labels)


@pytest.mark.slow
def test_sigterm_in_each_phase_writes_nothing_final_and_the_rerun_equals_an_uninterrupted_run(
    latent_run, tmp_path, monkeypatch, capsys
):
    """SIGTERM in the autoencoder phase, then (re-run) in the diffusion phase, then (re-run)
    while sampling: each run returns cleanly with no samples.npz; the last re-run writes the
    samples of an uninterrupted run, bit for bit."""
    from ddpm_jax import train
    from ddpm_jax.latent import frozen_vae
    from experiments import latent_digits

    workdir = tmp_path / "run"
    sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)
    with monkeypatch.context() as patch:  # 1: the autoencoder's training, at its step 5
        original = frozen_vae.train_autoencoder

        def vae_training(*args, callback, **kwargs):
            def hooked(step, params, opt_state):
                if step == 5:
                    sigterm()
                return callback(step, params, opt_state)

            return original(*args, callback=hooked, **kwargs)

        patch.setattr(frozen_vae, "train_autoencoder", vae_training)
        assert latent_digits.main(_tiny_latent_flags(workdir)) is None
    assert "saved the autoencoder's training at step 5" in capsys.readouterr().out
    assert (workdir / "vae_training.msgpack").exists() and not (workdir / "vae.msgpack").exists()

    with monkeypatch.context() as patch:  # 2: the diffusion phase, after its step 2
        hook = lambda step: sigterm() if step == 2 else None
        patch.setattr(train, "train", functools.partial(train.train, step_callback=hook))
        assert latent_digits.main(_tiny_latent_flags(workdir)) is None
    out = capsys.readouterr().out
    assert "resuming the autoencoder's training from step 5" in out
    assert "saved the checkpoint of step 2" in out and not (workdir / "samples.npz").exists()

    with monkeypatch.context() as patch:  # 3: while sampling the prompts
        original_sampling = prompts.sample_prompts
        interrupted = lambda *a, **k: sigterm() or original_sampling(*a, **k)
        patch.setattr(prompts, "sample_prompts", interrupted)
        assert latent_digits.main(_tiny_latent_flags(workdir)) is None
    assert "preempted (SIGTERM) while sampling" in capsys.readouterr().out
    assert not (workdir / "samples.npz").exists()

    assert latent_digits.main(_tiny_latent_flags(workdir))["train_steps"] == 4
    reference, _ = latent_run
    for name in ("vae.msgpack",):
        assert (workdir / name).read_bytes() == (reference / name).read_bytes()
    with np.load(workdir / "samples.npz") as a, np.load(reference / "samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
