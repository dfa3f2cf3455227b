"""Latent diffusion orchestration: frozen VAE, latent scaling, prompt-conditioned UNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import data, guidance, latent, samplers, schedules, train
from ddpm_jax import state as state_lib
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.models.text import PAD_ID, TextEncoder, Tokenizer
from ddpm_jax.models.unet import UNet

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
    return latent.resize_images(imgs[:n], 32), labels[:n]


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
    return latent.PromptUNet(
        unet=unet, text=text, prompt_tokens=latent.prompt_table(tokenizer, PROMPTS)
    )


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
    latents, scale = latent.encode_latents(vae, params, x, batch_size=5)
    assert latents.shape == (len(x), 8, 8, 4) and latents.dtype == np.float32
    mean, _ = jax.jit(lambda v: vae.apply(params, v, method=AutoencoderKL.encode))(x)
    mean = np.asarray(mean, np.float64)
    np.testing.assert_allclose(scale, 1.0 / mean.std(), rtol=1e-5)
    np.testing.assert_allclose(latents, mean * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latents.std(), 1.0, rtol=1e-4)
    # A given scale factor is used as is; the decoder inverts the scaling.
    latents2, scale2 = latent.encode_latents(vae, params, x, scale_factor=2.0)
    assert scale2 == 2.0
    np.testing.assert_allclose(latents2, mean * 2.0, rtol=1e-5, atol=1e-6)
    decode = latent.make_decode_fn(vae, params, scale)
    direct = jax.jit(lambda z: vae.apply(params, z, method=AutoencoderKL.decode))(
        jnp.asarray(mean, jnp.float32)
    )
    np.testing.assert_allclose(jax.jit(decode)(latents), np.clip(direct, -1, 1), atol=1e-5)


def test_null_prompt_is_the_empty_prompt(model_setup):
    tok, model, variables = model_setup
    assert model.num_classes == len(PROMPTS)
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
    from_tokens = jax.jit(lambda *a: model.apply(*a, method=latent.PromptUNet.from_tokens))
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
    from_tokens = jax.jit(lambda *a: model.apply(*a, method=latent.PromptUNet.from_tokens))
    out_new = np.asarray(from_tokens(variables, x[:2], t[:2], new))
    np.testing.assert_array_equal(out_new[0], out_new[1])
    assert np.abs(out_new[0] - out[0]).max() > 1e-3


def test_prompt_table_rejects_prompts_that_encode_to_nothing():
    tok = Tokenizer.from_prompts(PROMPTS, max_length=4)
    with pytest.raises(ValueError, match="empty prompt"):
        latent.prompt_table(tok, ["a handwritten zero", "!!"])


def test_frozen_vae_receives_no_updates(vae_setup, model_setup):
    vae, vae_params, x, labels = vae_setup
    _, model, variables = model_setup
    before = jax.tree.map(lambda a: np.array(a, copy=True), vae_params)
    latents, scale = latent.encode_latents(vae, vae_params, x)
    prompt_ids = np.array([2 * (c % 2) + (i % 2) for i, c in enumerate(labels)], np.int32)
    optimizer = optax.adam(1e-2)
    state = state_lib.create_train_state(variables, optimizer)
    assert set(state.params["params"]) == {"unet", "text"}  # no VAE parameter to optimise
    step_fn = state_lib.make_train_step(
        lambda p, x_t, t, y=None, rng=None: model.apply(p, x_t, t, y, train=True),
        schedules.get("cosine", 100),
        optimizer,
        seed=0,
        global_batch_size=len(latents),
        axis_name="data",
        p_uncond=0.25,
        num_classes=model.num_classes,
    )
    step = jax.jit(jax.vmap(step_fn, axis_name="data"))
    stacked = jax.tree.map(lambda a: a[None], state)
    batch = {
        "image": latents[None],
        "label": prompt_ids[None],
        "index": np.arange(len(latents), dtype=np.int32)[None],
    }
    decode = jax.jit(latent.make_decode_fn(vae, vae_params, scale))
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
    loss = lambda p: jnp.sum(latent.make_decode_fn(vae, p, scale)(latents[:2]))
    g = jax.jit(jax.grad(loss))(vae_params)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))


def test_latent_dataset_is_deterministic_and_epoch_complete():
    latents = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones(
        (1, 2, 2, 3), np.float32
    )
    labels = np.arange(10, dtype=np.int32) % 3
    ds = latent.LatentDataset(latents, labels, num_classes=3, global_batch_size=4, seed=1)
    assert ds.image_shape == (2, 2, 3) and ds.local_batch_size == 4
    flat = np.concatenate([ds.batch(s)["image"][:, 0, 0, 0] for s in range(5)])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) != list(flat[:10])
    it = ds.iterator(2)
    for s in (2, 3, 4):
        b = next(it)
        np.testing.assert_array_equal(b["image"], ds.batch(s)["image"])
        np.testing.assert_array_equal(b["label"], b["image"][:, 0, 0, 0].astype(int) % 3)
    halves = [
        latent.LatentDataset(
            latents,
            labels,
            num_classes=3,
            global_batch_size=4,
            seed=1,
            process_index=p,
            process_count=2,
        ).batch(3)["image"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), ds.batch(3)["image"])
    with pytest.raises(ValueError, match="num_classes"):
        latent.LatentDataset(latents, labels, num_classes=2, global_batch_size=4, seed=0)


def test_sample_from_tokens_decodes_to_images(vae_setup, model_setup):
    vae, vae_params, x, _ = vae_setup
    tok, model, variables = model_setup
    decode = latent.make_decode_fn(vae, vae_params, 1.5)
    tokens = tok.encode(["the digit 1", "a handwritten seven"])[0]  # "seven" is unknown
    imgs = jax.jit(
        lambda v, tk: latent.sample_from_tokens(
            model,
            v,
            schedules.get("cosine", 100),
            jax.random.key(0),
            tk,
            (8, 8, 4),
            decode_fn=decode,
            guidance_scale=2.0,
            num_steps=3,
        )
    )(variables, tokens)
    assert imgs.shape == (2, 32, 32, 1)
    assert float(jnp.abs(imgs).max()) <= 1.0 and bool(jnp.isfinite(imgs).all())


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
    schedule = train.build_schedule(config)
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
