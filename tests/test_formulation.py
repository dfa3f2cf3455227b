"""The formulations in the engine (``ddpm_jax.formulation``): the training step's EDM and flow
losses equal direct calls of ``edm.loss`` / ``flow.loss`` on the same per-example keys, the
Generator's samples equal ``edm.sample`` / ``flow.sample`` called directly (guided), the config
checks, and the formulation is part of a run's identity on resume; end to end, a tiny EDM and a
tiny flow run train, sample, resume and refuse another formulation."""

import json
import os

import _worker_runs as wr
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import (
    builders,
    cli,
    config as config_lib,
    edm,
    flow,
    guidance,
    parallel,
    resume,
    schedules,
    state as state_lib,
)
from ddpm_jax.errors import UsageError
from ddpm_jax.formulation import Formulation
from ddpm_jax.generate import Generator
from ddpm_jax.sample_settings import SampleSettings

EDM = Formulation(kind="edm", sigma_data=0.7, p_mean=-1.0, p_std=1.1)
FLOW = Formulation(kind="flow", shift=2.0, t_distribution="logit_normal")


class Tiny(nn.Module):
    """A class-conditional toy network: per-channel scale of x plus a function of t and y."""

    null_label: int | None = 3

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        w = self.param("w", nn.initializers.constant(0.9), (x.shape[-1],))
        b = self.param("b", nn.initializers.normal(1.0), (4, x.shape[-1]))
        t = jnp.asarray(t, jnp.float32)[:, None, None, None]
        return w * x * jnp.cos(0.1 * t) + b[y][:, None, None, :] + 0.01 * t


def _apply_fn(model):
    return lambda p, x, t, y=None, rng=None, example_index=None: model.apply(p, x, t, y=y)


@pytest.mark.parametrize("formulation", [EDM, FLOW], ids=["edm", "flow"])
def test_the_training_loss_is_edm_or_flow_loss_on_the_same_keys(formulation):
    model = Tiny()
    x0 = jax.random.uniform(jax.random.key(1), (6, 4, 4, 2), minval=-1.0, maxval=1.0)
    labels = jnp.arange(6, dtype=jnp.int32) % 3
    params = model.init(jax.random.key(0), x0, jnp.zeros(6), y=labels)
    optimizer = optax.sgd(0.1)
    settings = state_lib.StepSettings(seed=5, global_batch_size=6, p_uncond=0.3)
    step_fn = state_lib.make_train_step(
        _apply_fn(model),
        schedules.get("linear", 10),
        optimizer,
        settings.replace(formulation=formulation),
        map_grads=lambda f: f,
        null_label=model.null_label,
    )
    state = state_lib.create_train_state(params, optimizer)
    batch = {"image": x0, "label": labels, "index": jnp.arange(6, dtype=jnp.int32)}
    _, metrics = jax.jit(step_fn)(state.replace(step=jnp.int32(3)), batch)

    keys = state_lib.example_keys(5, jnp.int32(3), batch["index"])
    keys, drop = state_lib.split_dropout_keys(keys, 0.3)
    y = jnp.where(drop, model.null_label, labels)
    net = lambda x, t, **c: model.apply(params, x, t, **c)
    if formulation.kind == "edm":
        sigma, noise = edm.sample_sigma_and_noise(
            keys, x0, distribution="lognormal", p_mean=-1.0, p_std=1.1
        )
        denoise = edm.denoiser(net, sigma_data=0.7, kind="edm")
        want = edm.loss(denoise, x0, sigma, noise, sigma_data=0.7, weighting="edm", cond={"y": y})
    else:
        t, noise = flow.sample_t_and_noise(keys, x0, distribution="logit_normal", shift=2.0)
        velocity = lambda x, t_, **c: net(x, 1000 * t_, **c)
        want = flow.loss(velocity, x0, t, noise, cond={"y": y})
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


@pytest.mark.parametrize(
    "formulation, method, steps", [(EDM, "heun", 4), (FLOW, "euler", 3)], ids=["edm", "flow"]
)
def test_generator_samples_are_the_formulations_sampler_guided(formulation, method, steps):
    model = Tiny()
    shape = (4, 4, 2)
    params = model.init(
        jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros(1), y=jnp.zeros(1, int)
    )
    settings = SampleSettings(method=method, num_steps=steps, guidance_scale=1.5, batch_size=8)
    dp = parallel.make("shard_map")
    gen = Generator(
        model, schedules.get("linear", 10), dp, shape, settings, formulation=formulation
    )
    key, labels = jax.random.key(7), np.array([0, 1, 2, 1, 3, 0, 2, 3], np.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(8, dtype=jnp.uint32))
    got = gen._fn(8, "labels")(params, keys, jnp.asarray(labels), np.float32(1.5), None)

    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    net = lambda x, t, **c: model.apply(params, x, t, **c)
    if formulation.kind == "edm":
        denoise = guidance.classifier_free(edm.denoiser(net, sigma_data=0.7), 1.5, 3)
        sigmas = edm.sigma_steps(steps)
        want = edm.sample(lambda x, s: denoise(x, s, y=labels), sigmas[0] * noise, sigmas)
    else:
        velocity = guidance.classifier_free(lambda x, t, **c: net(x, 1000 * t, **c), 1.5, 3)
        ts = flow.timesteps(steps, 2.0)
        want = flow.sample(lambda x, t: velocity(x, t, y=labels), noise, ts, method="euler")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    imgs, _ = gen(params, key, 8, labels=labels)
    assert imgs.shape == (8, *shape) and imgs.dtype == np.uint8


def test_nfe_of_the_recipes():
    assert EDM.nfe("heun", 18) == 35 and EDM.nfe("euler", 18) == 18
    assert FLOW.nfe("heun", 17) == 34 and FLOW.nfe("euler", 35) == 35


def test_config_checks_the_formulation_and_its_samplers():
    c = config_lib.default_config()
    assert builders.formulation(c).kind == "ddpm"
    c.diffusion.formulation = "edm"
    with pytest.raises(UsageError, match=r"config.sample.method='ddim' .*\['heun', 'euler'\]"):
        config_lib.validate(c)
    c.sample.method, c.eval.method = "heun", "euler"
    config_lib.validate(c)
    assert builders.step_settings(c).formulation.kind == "edm"
    c.diffusion.formulation = "score"
    with pytest.raises(UsageError, match="config.diffusion.formulation='score'"):
        config_lib.validate(c)
    c.diffusion.formulation = "flow"
    c.diffusion.shift = -1.0
    with pytest.raises(UsageError, match="config.diffusion.shift=-1.0"):
        config_lib.validate(c)


def test_the_formulation_is_part_of_the_run_identity():
    saved = json.loads(config_lib.default_config().to_json())
    given = json.loads(config_lib.default_config().to_json())
    given["diffusion"]["formulation"] = "flow"
    conflicts, _ = resume.resume_changes(saved, given)
    assert conflicts == {"diffusion.formulation": ("ddpm", "flow")}
    for field in ("sigma_data", "formulation", "shift", "rho"):  # a config from before them: DDPM
        del saved["diffusion"][field]
    assert resume.resume_changes(saved, json.loads(config_lib.default_config().to_json())) == (
        {},
        {},
    )


@pytest.mark.slow  # two subprocess runs each: about a minute
@pytest.mark.parametrize("kind, method", [("edm", "heun"), ("flow", "euler")])
def test_a_tiny_run_trains_samples_resumes_and_keeps_its_formulation(
    kind, method, cache_dir, tmp_path, capfd
):
    workdir = str(tmp_path / kind)
    args = [f"--config.diffusion.formulation={kind}", f"--config.sample.method={method}"]
    args += ["--config.sample.num_steps=3", f"--config.eval.method={method}"]
    first = wr.launch(cache_dir, workdir, *args, "--config.train.num_steps=8", devices=2)
    wr.check_ok(first)
    resumed = wr.launch(cache_dir, workdir, *args, devices=2)
    wr.check_ok(resumed)
    assert "resuming from the checkpoint of step 8" in resumed.stdout
    losses = wr.losses(workdir)
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    samples = np.load(os.path.join(workdir, "samples.npz"))
    assert samples["images"].shape == (16, 8, 8, 1) and samples["images"].std() > 0
    other = "flow" if kind == "edm" else "edm"
    code, err = wr.cli_error(
        ["prog", f"--workdir={workdir}", *args, f"--config.diffusion.formulation={other}"], capfd
    )
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert f"diffusion.formulation was '{kind}', now '{other}'" in err[0]
