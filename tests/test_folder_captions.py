"""A captioned folder trains the latent text-conditioned recipe (``experiments.folder`` with
``experiments/folder_captions.py``, ``ddpm_jax.latent.captions``): the digits written with
captions "a handwritten {d}" (``metadata.jsonl``) and "the digit {d}" (a ``.txt`` beside every
4th image).

- the captions become sorted, normalised prompts, each standing for its images' class;
- missing, empty and too long captions are one line each, before anything is decoded; a
  captioned folder with a missing caption under ``data.captions=True`` exits 2 with one line;
- ``data.captions`` None picks the text recipe when every image has a caption, False ignores them;
- (slow) a tiny text-conditioned run end to end: prompt grids and ``samples.npz`` (labels: the
  captions' classes), the same command again only reports, ``experiments.sample --prompt``
  samples it without the folder, a changed caption is refused in one line;
- (slow) the acceptance run: the default recipe at 16 px, the digits classifier recognises the
  digit of "a handwritten d" in the guided samples.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import _folders
import _worker_runs as wr
import numpy as np
import pytest

from ddpm_jax import cli, images
from ddpm_jax.config import validate
from ddpm_jax.errors import UsageError
from ddpm_jax.evaluation import digits_classifier
from ddpm_jax.latent import captions, pipeline
from experiments import folder as folder_experiment, folder_captions, sample as sample_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _captioned(tmp_path, limit=40, size=8):
    root = str(tmp_path / "digits")
    _folders.write_digits_folder(root, size=size, limit=limit)
    return root, _folders.caption_digits_folder(root)


def test_captions_become_sorted_normalised_prompts_of_their_class():
    texts = ["A handwritten 7.", "a  handwritten 7", "the digit 3", "a photo", "a photo"]
    cp = captions.caption_prompts(texts, np.array([7, 7, 3, 1, 2]))
    assert cp.prompts == ["a handwritten 7", "a photo", "the digit 3"]
    np.testing.assert_array_equal(cp.image_prompt, [0, 0, 2, 1, 1])
    np.testing.assert_array_equal(cp.prompt_class, [7, -1, 3])  # "a photo": two classes
    flat = captions.caption_prompts(texts, np.full(5, -1))  # no classes: the caption's id
    np.testing.assert_array_equal(flat.prompt_class, [0, 1, 2])


def test_missing_empty_and_long_captions_are_one_line_each(tmp_path):
    root, written = _captioned(tmp_path, limit=12)
    listing, found = captions.folder_captions(root)
    assert found == [written[f] for f in listing.files]  # metadata.jsonl and .txt files
    captions.check_captions(listing, found, max_length=3)
    with pytest.raises(UsageError, match=r"more than latent.text_max_length=2 words, the longest"):
        captions.check_captions(listing, found, max_length=2)
    first = os.path.join(listing.root, listing.files[0])
    with pytest.raises(UsageError, match=r"1 image\(s\) have an empty caption.*" + first):
        captions.check_captions(listing, ["!?", *found[1:]], max_length=3)
    with pytest.raises(UsageError, match=r"data.captions=True: 2 of 12 images .* no caption"):
        captions.check_captions(listing, [None, None, *found[2:]], max_length=3)


def test_the_recipe_follows_the_captions(tmp_path):
    root, written = _captioned(tmp_path, limit=12)
    argv = ["folder.py", f"--config.data.dir={root}", "--config.data.image_size=16"]
    assert folder_experiment.recipe_of(argv) == dict(image_size=16, text=True, max_words=3)
    c = folder_experiment.get_config(**folder_experiment.recipe_of(argv))
    c.data.dir = root
    validate(c)
    assert "latent" in c and c.latent.image_size == 16 and c.latent.text_max_length == 6
    assert c.latent.vae_block_out_channels == (16, 32)  # 16 px -> 8x8x4 latents
    off = argv + ["--config.data.captions=False"]
    assert folder_experiment.recipe_of(off)["text"] is False
    assert "latent" not in folder_experiment.get_config(**folder_experiment.recipe_of(off))
    txt = next(f for f, t in written.items() if t.startswith("the digit"))
    os.remove(os.path.join(root, os.path.splitext(txt)[0] + ".txt"))  # one image uncaptioned
    assert folder_experiment.recipe_of(argv)["text"] is False
    assert folder_experiment.recipe_of(argv + ["--config.data.captions", "True"])["text"] is True
    for size in (8, 16, 32, 64, 128):
        c = folder_experiment.get_config(size, text=True, max_words=9)
        c.data.dir = root
        validate(c)
        assert c.latent.text_max_length == 9


def test_a_missing_caption_with_captions_required_exits_2_in_one_line(tmp_path, capfd):
    root, written = _captioned(tmp_path, limit=12)
    txt = next(f for f, t in written.items() if t.startswith("the digit"))
    os.remove(os.path.join(root, os.path.splitext(txt)[0] + ".txt"))
    workdir = str(tmp_path / "run")
    argv = ["folder.py", f"--workdir={workdir}", f"--config.data.dir={root}"]
    argv += ["--config.data.image_size=8", "--config.data.captions=True"]
    argv += [f"--config.data.cache_dir={tmp_path / 'cache'}"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder_experiment.main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert exit_info.value.code == cli.EXIT_USAGE and len(err) == 1, err
    assert "1 of 12 images" in err[0] and txt in err[0], err
    assert not os.path.exists(workdir) and not os.path.exists(tmp_path / "cache")


def test_a_run_refuses_other_captions(tmp_path):
    (tmp_path / pipeline.LATENT_FILE).write_text(json.dumps({"prompts": ["a", "b"]}))
    folder_captions._check_same_prompts(str(tmp_path), ["a", "b"])
    with pytest.raises(UsageError, match=r"other captions \(no longer: \['b'\]; new: \['c'\]\)"):
        folder_captions._check_same_prompts(str(tmp_path), ["a", "c"])


def _tiny(root, workdir, cache):
    argv = ["folder.py", f"--workdir={workdir}", f"--config.data.dir={root}"]
    argv += ["--config.data.image_size=8", f"--config.data.cache_dir={cache}"]
    argv += ["--config.latent.vae_steps=2", "--config.model.ch=8", "--config.train.num_steps=2"]
    argv += ["--config.train.batch_size=8", "--config.latent.samples_per_prompt=1"]
    argv += ["--config.sample.num_steps=2", "--config.train.steps_per_call=1"]
    return argv


@pytest.mark.slow
def test_a_tiny_text_conditioned_run_end_to_end(tmp_path, capfd):
    """(2.5 min on 2 busy cores) train, run again, sample a prompt without the folder, refuse a
    changed caption."""
    root, written = _captioned(tmp_path, limit=40)
    workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    result = folder_experiment.main(_tiny(root, workdir, cache))
    assert result.status == "completed" and result.step == 2
    prompts = json.load(open(os.path.join(workdir, pipeline.LATENT_FILE)))["prompts"]
    assert prompts == sorted(set(written.values())) and "a handwritten 7" in prompts
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        assert f["images"].shape == (len(prompts), 8, 8, 1)
        np.testing.assert_array_equal(f["labels"], [int(p[-1]) for p in prompts])
    assert len(os.listdir(os.path.join(workdir, "prompts"))) == len(prompts)
    assert folder_experiment.main(_tiny(root, workdir, cache)).status == "already_complete"
    moved = str(tmp_path / "elsewhere")
    shutil.move(root, moved)  # sampling needs no folder
    out = str(tmp_path / "sampled")
    argv = ["sample.py", f"--workdir={workdir}", "--prompt=a handwritten 7", f"--out={out}"]
    sample_experiment.main(argv + ["--num_samples=3", "--num_steps=2"])
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (3, 8, 8, 1)
    assert os.path.isfile(os.path.join(out, "samples.png"))
    shutil.move(moved, root)
    txt = next(f for f, t in written.items() if t.startswith("the digit"))
    with open(os.path.join(root, os.path.splitext(txt)[0] + ".txt"), "w") as f:
        f.write("a new caption")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        folder_experiment.main(_tiny(root, workdir, cache))
    err = capfd.readouterr().err.strip().splitlines()
    assert exit_info.value.code == cli.EXIT_USAGE and len(err) == 1 and "other captions" in err[0]


@pytest.mark.slow
def test_acceptance_digits_as_a_captioned_folder(tmp_path):
    """7 to 12 min on 2 shared cores; prints the time and the accuracy."""
    root, _ = _captioned(tmp_path, limit=None, size=16)
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("XLA_FLAGS", None)  # the command as a user runs it (no test device flags)
    cmd = [sys.executable, "-m", "experiments.folder", f"--workdir={workdir}"]
    cmd += [f"--config.data.dir={root}", "--config.data.image_size=16"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.time() - t0
    wr.check_ok(proc)
    prompts = json.load(open(os.path.join(workdir, pipeline.LATENT_FILE)))["prompts"]
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        samples, labels = f["images"], f["labels"]
    assert samples.shape == (25 * len(prompts), 16, 16, 1)
    classifier = digits_classifier.train_digits_classifier(seed=0)
    correct = classifier.predict(images.resize(samples, (8, 8))) == labels
    handwritten = np.array([p.startswith("a handwritten") for p in prompts])
    handwritten = handwritten[np.arange(len(samples)) % len(prompts)]
    accuracy = float(correct[handwritten].mean())
    print(f"acceptance: {seconds:.0f} s, 'a handwritten d' accuracy {accuracy:.3f}")
    assert accuracy >= 0.9
