"""Every config field classified for a resume (``ddpm_jax.resume``), ``--allow_change``, and the
data stream continued after a batch-size change.

The classification and the data position are checked without JAX; the end-to-end tests relaunch
the reference run of conftest.py (12 steps of batch 16, checkpoints every 4) with a batch of 32.
"""

import hashlib
import json
import os
import re
import shutil

import _train_worker as worker
import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import cli, config, config_finetune, data, resume
from ddpm_jax.errors import UsageError


def _leaves(tree, prefix=""):
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _all_fields():
    c = config.default_config()
    c.latent = config.latent_config()
    c.finetune = config_finetune.finetune_config()
    return _leaves(c.to_dict())


def test_every_config_field_is_classified_exactly_once():
    tables = {"IDENTITY": resume.IDENTITY, "TRAINING": resume.TRAINING, "FREE": resume.FREE}
    fields = _all_fields()
    unclassified = [f for f in fields if not any(f in t for t in tables.values())]
    assert not unclassified, f"add each to one table of ddpm_jax/resume.py: {unclassified}"
    twice = [f for f in fields if sum(f in t for t in tables.values()) > 1]
    assert not twice, f"classified more than once: {twice}"
    for name, table in tables.items():
        assert len(set(table)) == len(table), f"{name} lists a field twice"
        stale = sorted(set(table) - set(fields))
        assert not stale, f"{name} names no config field: {stale}"
    for field in ("train.batch_size", "diffusion.weighting", "diffusion.min_snr_gamma"):
        assert field in resume.TRAINING
    for field in ("train.p_uncond", "data.random_flip", "data.num_examples"):
        assert field in resume.TRAINING


def _saved_run(tmp_path, **changes):
    """A workdir whose config.json is the default config; the default with ``changes``."""
    saved = config.default_config()
    (tmp_path / "config.json").write_text(saved.to_json())
    given = config.default_config()
    for field, value in changes.items():
        section, name = field.split("__")
        given[section][name] = value
    return str(tmp_path), given


def test_a_training_change_is_refused_unless_allowed(tmp_path):
    workdir, given = _saved_run(tmp_path, train__batch_size=256, train__lr=1e-4)
    with pytest.raises(UsageError) as e:
        resume.check_resume(given, workdir)
    assert "train.batch_size was 128, now 256" in str(e.value)
    assert "--allow_change=train.batch_size " in str(e.value) and "train.lr" not in str(e.value)
    changes = resume.check_resume(given, workdir, ["train.batch_size"])
    assert changes == {"train.batch_size": (128, 256), "train.lr": (2e-4, 1e-4)}


def test_identity_is_refused_and_clipping_switched_off_too(tmp_path):
    workdir, given = _saved_run(tmp_path, model__ch=64, train__grad_clip=0.0)
    with pytest.raises(UsageError, match=r"model.ch was 128, now 64; train.grad_clip was 1.0"):
        resume.check_resume(given, workdir, ["train.batch_size"])
    workdir, given = _saved_run(tmp_path, train__grad_clip=0.5)  # another value: free
    assert resume.check_resume(given, workdir) == {"train.grad_clip": (1.0, 0.5)}


@pytest.mark.parametrize(
    "name, why",
    [
        ("model.ch", "model.ch fixes what the run is"),
        ("train.lr", "train.lr may change on resume without it"),
        ("train.batchsize", "train.batchsize is not a field it takes"),
    ],
)
def test_allow_change_takes_training_fields_only(name, why):
    with pytest.raises(UsageError, match=re.escape(why)) as e:
        resume.check_allow_change(["train.batch_size", name])
    assert f"--allow_change=train.batch_size,{name}: " in str(e.value)
    assert resume.check_allow_change(["train.batch_size", ""]) == ("train.batch_size",)


def _record(step, seen, batch):
    return {"step": step, "examples_seen": seen, "batch_size": batch}


def test_data_position_follows_the_batch_size_history():
    position = resume.data_position
    assert position([], 12, 16, 16) == (192, False)  # never changed: step * batch
    assert position([], 12, 16, 32) == (192, True)  # changed now: recorded
    assert position([], 0, 16, 32) == (0, False)  # a new start: nothing to continue
    history = [{"step": 4, "changes": {}}, _record(12, 192, 32)]
    assert position(history, 20, 32, 32) == (192 + 8 * 32, False)
    assert position(history, 20, 32, 8) == (448, True)
    # Fallen back to step 8 (checkpoints 12 and later lost): batch 16 until then; the record at
    # 12 is superseded by the one this start writes, whatever the batch size now.
    assert position(history, 8, 32, 32) == (128, True)
    assert position(history, 8, 32, 16) == (128, True)
    history.append(_record(8, 128, 32))
    assert position(history, 12, 32, 32) == (128 + 4 * 32, False)
    history.append(_record(0, 0, 64))  # started over from step 0 with batch 64
    assert position(history, 12, 64, 64) == (12 * 64, False)
    history += [_record(12, 768, 8), _record(12, 768, 16)]  # two starts at 12: the last holds
    assert position(history, 14, 16, 16) == (768 + 2 * 16, False)


# ----------------------------------------------------------------------------- end to end


def test_a_changed_batch_size_is_refused_with_one_line(reference, tmp_path, capfd):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    before = wr.digest(workdir)
    args = ["prog", f"--workdir={workdir}", "--config.train.batch_size=32"]
    code, err = wr.cli_error([*args, "--config.train.num_steps=16"], capfd)
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "train.batch_size was 16, now 32" in err[0]
    assert "--allow_change=train.batch_size " in err[0]
    for bad in ("model.ch", "train.num_steps", "train.batch"):  # identity, free, unknown
        code, err = wr.cli_error([*args, f"--allow_change={bad}"], capfd)
        assert code == cli.EXIT_USAGE and len(err) == 1 and f"--allow_change={bad}:" in err[0]
    assert wr.digest(workdir) == before  # byte for byte: checkpoints, config, metrics


def test_an_allowed_batch_size_change_continues_the_data_stream(reference, cache_dir, tmp_path):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    args = ["--config.train.batch_size=32", "--config.train.num_steps=16"]
    args += ["--allow_change=train.batch_size", "--print_first_batch"]
    proc = wr.launch(cache_dir, workdir, *args)
    wr.check_ok(proc)
    assert "resuming from the checkpoint of step 12" in proc.stdout
    assert "train.batch_size 16 -> 32 (--allow_change)" in proc.stdout
    assert [m["step"] for m in wr.metrics(workdir)] == list(range(1, 17))
    history = [json.loads(line) for line in open(os.path.join(workdir, "config_history.jsonl"))]
    assert len(history) == 1
    h = history[0]
    assert h["step"] == 12 and h["changes"]["train.batch_size"] == [16, 32]
    assert h["allowed"] == ["train.batch_size"]
    assert (h["examples_seen"], h["batch_size"]) == (12 * 16, 32)
    # The first batch after the change is the 32 examples an unchanged run would have read at
    # steps 12 and 13: flat positions [192, 224) of the same stream.
    c = worker.tiny_config()
    ds16 = data.make_dataset(
        c.data.name, global_batch_size=16, seed=c.seed, process_index=0, process_count=1
    )
    images = [ds16.batch(s)["image"] for s in (12, 13)]
    labels = [int(v) for s in (12, 13) for v in ds16.batch(s)["label"]]
    digest = hashlib.sha256(np.ascontiguousarray(np.concatenate(images))).hexdigest()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("first batch:"))
    assert line == f"first batch: start_step=12 examples_seen=192 labels={labels} sha256={digest}"
