"""Tests of Stable Diffusion fine-tuning (``experiments.finetune_sd``,
``ddpm_jax.latent.finetune_sd``, ``ddpm_jax.models.sd_captions``) on a tiny random SD 1.x-like
pipeline (``test_sd_pipeline.tiny_pipeline``; skipped without torch / diffusers) and 64 digits
written as a folder with a ``metadata.jsonl`` of captions ``"a handwritten <digit>"``.

Known answers: the engine starts from exactly the pretrained parameters; the caption model is the
SD UNet on the text encoder's states of the caption (the empty prompt's for the null label).
End to end (slow): 200 steps lower the loss; a run killed with SIGKILL and resumed equals the
uninterrupted run bit for bit (every logged loss, the final EMA parameters); ``experiments.sample
--workdir`` equals ``SDPipeline`` with the run's EMA UNet substituted and differs from the
pretrained pipeline's samples of the same noise. Mistakes are one line with exit code 2.
"""

import json
import os
import shutil

import _worker_runs as wr
import jax
import numpy as np
import pytest
from test_sd_pipeline import tiny_pipeline
from test_sd_sample import SD1_SCHEDULER, UNET

from ddpm_jax import builders, state as state_lib
from ddpm_jax.latent import finetune_sd as ft
from experiments import finetune_sd, sample

FINETUNE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_finetune_worker.py")
PROMPT = "a handwritten 7"
STEPS = 200


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny pipeline folder (16×16 images, 8×8×4 latents, ε-prediction)."""
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("sd_finetune")
    scheduler = diffusers.DDIMScheduler.from_config(SD1_SCHEDULER)
    tiny_pipeline(
        root, UNET, pad="<|endoftext|>", activation="quick_gelu", scheduler=scheduler, perturb=True
    )
    return str(root / "pipe")


def write_captioned_digits(directory, limit=64):
    """64 digits at 16 px in ``directory`` with ``metadata.jsonl``: "a handwritten <digit>"."""
    from _folders import write_digits_folder

    _, labels = write_digits_folder(directory, size=16, limit=limit, classes=False, kinds=("png",))
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        for i, label in enumerate(labels):
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"a handwritten {label}"}))
            f.write("\n")
    return labels


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    directory = tmp_path_factory.mktemp("captioned")
    write_captioned_digits(str(directory))
    return str(directory)


def _flags(pipe, captioned, cache, steps=STEPS):
    return [
        f"--pretrained={pipe}",
        f"--config.data.dir={captioned}",
        f"--config.data.cache_dir={cache}",
        f"--config.train.num_steps={steps}",
        "--config.train.batch_size=8",
        "--config.train.lr=1e-3",
        "--config.train.ema_decay=0.99",
        "--config.train.log_every=10",
        "--config.train.checkpoint_every=50",
        "--config.train.sample_every=100",
        "--config.train.steps_per_call=10",
        f"--config.finetune.grid_prompts=('{PROMPT}', 'a handwritten 1')",
        "--config.sample.num_steps=5",
        "--config.sample.num_samples=4",
    ]


def _exit_2(argv, capfd):
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        finetune_sd.main(["finetune_sd", *argv])
    err = capfd.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_the_engine_starts_from_the_pretrained_unet_and_captions_index_contexts(pipe):
    from ddpm_jax.models.sd_captions import CaptionUNet
    from ddpm_jax.weights import load_stable_diffusion

    sd = load_stable_diffusion(pipe)
    prompts = [PROMPT, "", "a handwritten 1"]
    contexts = ft.embed_prompts(sd, prompts)
    model = CaptionUNet(sd.unet, contexts, null_label=1)
    config = finetune_sd.get_config()
    optimizer, _ = builders.build_optimizer(config)
    init = builders.init_state_fn(config, model, optimizer, (8, 8, 4))
    abstract = builders.abstract_state(init, builders.build_parallel(config))
    state = builders.init_state(init, abstract, sd.unet_variables)
    assert isinstance(state, state_lib.TrainState) and int(state.step) == 0
    assert wr.max_diff(state.params, sd.unet_variables) == 0
    assert wr.max_diff(state.ema_params, sd.unet_variables) == 0

    x = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 500, 900], np.int32)

    @jax.jit
    def outputs(v):
        ours = model.apply(v, x, t, y=np.array([0, 1, 2]), train=True)
        null = model.apply(v, x, t)  # no label: the null row, the empty prompt's states
        return ours, null, sd.unet.apply(v, x, t, contexts)

    ours, null, ref = (np.asarray(a) for a in outputs(sd.unet_variables))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(null[1], ref[1])  # row 1 of the table is the empty prompt
    assert np.abs(null[0] - ref[0]).max() > 1e-3
    assert model.null_label == 1


def test_fingerprint_follows_the_content_not_the_path(pipe, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(pipe, copy)
    assert ft.fingerprint(copy) == ft.fingerprint(pipe)
    _change_a_unet_byte(copy)
    assert ft.fingerprint(copy) != ft.fingerprint(pipe)


def _change_a_unet_byte(directory):
    """Another model of the same shapes: the last byte of the UNet's weights changed."""
    [name] = [n for n in os.listdir(os.path.join(directory, "unet")) if n.endswith("safetensors")]
    path = os.path.join(directory, "unet", name)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


def test_mistakes_are_one_line_with_exit_code_2(pipe, captioned, tmp_path, capfd):
    given = ["prog", "--pretrained", "A", "--workdir=W", "--pretrained=B"]
    expected = ["prog", "--config.finetune.pretrained=A", "--workdir=W"]
    assert finetune_sd.pretrained_flag(given) == [*expected, "--config.finetune.pretrained=B"]
    base = [f"--workdir={tmp_path / 'run'}", f"--config.data.dir={captioned}"]
    assert "--pretrained" in _exit_2(base, capfd)
    not_sd = tmp_path / "not_sd"
    not_sd.mkdir()
    err = _exit_2([*base, f"--pretrained={not_sd}"], capfd)
    assert "not a Stable Diffusion pipeline folder" in err

    uncaptioned = tmp_path / "uncaptioned"
    write_captioned_digits(str(uncaptioned), limit=3)
    os.remove(uncaptioned / "metadata.jsonl")
    (uncaptioned / "00001.txt").write_text("a handwritten 1")
    flags = [f"--pretrained={pipe}", f"--config.data.cache_dir={tmp_path / 'cache'}"]
    err = _exit_2(
        [f"--workdir={tmp_path / 'u'}", f"--config.data.dir={uncaptioned}", *flags], capfd
    )
    assert "2 of 3 images have no caption (first: 00000.png)" in err, err

    # A run recorded with another pretrained model is refused before anything is changed.
    run = tmp_path / "other"
    run.mkdir()
    record = {"pretrained": "/elsewhere/sd", "fingerprint": "0" * 16}
    (run / ft.RECORD).write_text(json.dumps(record))
    err = _exit_2([f"--workdir={run}", f"--config.data.dir={captioned}", *flags], capfd)
    assert "another model" in err and "/elsewhere/sd" in err, err
    assert set(os.listdir(run)) <= {ft.RECORD, ".trainer.lock"}
    assert json.loads((run / ft.RECORD).read_text()) == record


@pytest.fixture(scope="module")
def finished(pipe, captioned, tmp_path_factory, cache_dir):
    """The uninterrupted 200-step run (a subprocess on 1 device): its workdir."""
    root = tmp_path_factory.mktemp("finetune_runs")
    workdir = str(root / "ref")
    flags = _flags(pipe, captioned, root / "cache")
    proc = wr.launch(cache_dir, workdir, *flags, devices=1, worker=FINETUNE_WORKER)
    wr.check_ok(proc)
    return workdir


@pytest.mark.slow
def test_finetuning_lowers_the_loss_and_samples_with_the_run(finished, pipe, tmp_path):
    from ddpm_jax.latent.stable_diffusion import SD_SETTINGS, SDPipeline
    from ddpm_jax.weights import load_stable_diffusion
    from ddpm_jax.workdir import FINAL_TAG, run_key

    losses = wr.losses(finished)[:, 1]
    assert len(losses) == STEPS // 10
    first, last = losses[:3].mean(), losses[-3:].mean()
    print(f"loss: first 3 logged {first:.4f}, last 3 logged {last:.4f}")
    assert last < 0.5 * first
    record = json.load(open(os.path.join(finished, ft.RECORD)))
    assert record["grid_prompts"] == [PROMPT, "a handwritten 1"]
    assert record["num_images"] == 64 and record["num_captions"] == 10
    assert os.path.isfile(os.path.join(finished, "samples", f"step_{STEPS:07d}.png"))
    with np.load(os.path.join(finished, "samples.npz")) as f:
        assert f["images"].shape == (4, 16, 16, 3) and list(f["labels"]) == [0, 1, 0, 1]

    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    common = [f"--prompt={PROMPT}", "--num_samples=2", "--num_steps=10"]
    common += [f"--noise={tmp_path / 'noise.npy'}"]
    out = sample.main(["sample", f"--workdir={finished}", *common])
    assert out.startswith(os.path.join(finished, "sampled"))
    assert os.path.isfile(os.path.join(out, "samples.png"))
    with np.load(os.path.join(out, "samples.npz")) as f:
        ours = f["images"]
    pretrained_out = sample.main(
        ["sample", f"--pretrained={pipe}", *common, "--out", str(tmp_path)]
    )
    with np.load(os.path.join(pretrained_out, "samples.npz")) as f:
        before = f["images"]
    assert np.abs(ours.astype(int) - before.astype(int)).mean() > 1  # the run's UNet is used

    sd = load_stable_diffusion(pipe)
    ema = wr.params(finished, STEPS, "ema_params")
    tuned = sd._replace(unet_variables=jax.tree.map(np.asarray, ema))
    pipeline = SDPipeline(tuned, SD_SETTINGS.replace(num_steps=10))  # the command's defaults
    ref = pipeline(run_key(0, FINAL_TAG), 2, prompt=PROMPT, noise=noise)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
def test_kill_and_resume_equals_the_uninterrupted_run(
    finished, pipe, captioned, tmp_path, cache_dir, capfd
):
    workdir = str(tmp_path / "killed")
    flags = _flags(pipe, captioned, tmp_path / "cache")
    proc = wr.launch(
        cache_dir, workdir, *flags, "--signal_at=130:SIGKILL", devices=1, worker=FINETUNE_WORKER
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert wr.checkpoint_steps(workdir)[-1] < STEPS
    resumed = wr.launch(cache_dir, workdir, *flags, devices=1, worker=FINETUNE_WORKER)
    wr.check_ok(resumed)
    assert "resuming from the checkpoint of step" in resumed.stdout
    assert "latents and caption states read from" in resumed.stdout  # not encoded again
    np.testing.assert_array_equal(wr.losses(workdir), wr.losses(finished))
    a, b = wr.params(workdir, STEPS, "ema_params"), wr.params(finished, STEPS, "ema_params")
    assert wr.max_diff(a, b) == 0

    other = str(tmp_path / "other_sd")
    shutil.copytree(pipe, other)
    _change_a_unet_byte(other)
    flags = [f if not f.startswith("--pretrained=") else f"--pretrained={other}" for f in flags]
    err = _exit_2([f"--workdir={workdir}", *flags], capfd)
    assert "another model" in err and pipe in err, err


@pytest.mark.slow
def test_fsdp_in_bfloat16_on_2_devices_follows_the_float32_run(
    finished, pipe, captioned, tmp_path, cache_dir
):
    workdir = str(tmp_path / "fsdp")
    flags = _flags(pipe, captioned, tmp_path / "cache", steps=40)
    flags += ["--config.parallel=fsdp", "--config.mesh.fsdp_min_size=1"]
    flags += ["--config.model.dtype=bfloat16"]
    proc = wr.launch(cache_dir, workdir, *flags, devices=2, worker=FINETUNE_WORKER)
    wr.check_ok(proc)
    assert "training state (fsdp)" in proc.stdout
    ours, ref = wr.losses(workdir)[:, 1], wr.losses(finished)[:4, 1]
    np.testing.assert_allclose(ours, ref, rtol=2e-2)
    out = sample.main(
        ["sample", f"--workdir={workdir}", f"--prompt={PROMPT}", "--num_samples=2", "--num_steps=3"]
    )  # the sharded run's EMA is gathered for the pipeline
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (2, 16, 16, 3)
