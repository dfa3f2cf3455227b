"""A folder of images as a dataset (ddpm_jax.folder_images / folder_scan / folder_source, the
folder branch of ddpm_jax.builders, experiments.folder): decoding every kind of file, classes,
captions, the prepared cache (reused, re-prepared after a change, written atomically), unreadable
files, the deterministic batches, and a run's record that sampling reads without the folder.

The end-to-end runs (resume after kill -9, 1 vs 4 devices, the digits acceptance) are in
``test_folder_runs.py``.
"""

import json
import os
import time

import _folders
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import builders, cli, data, folder_images, folder_source
from ddpm_jax.config import default_config, validate
from ddpm_jax.errors import UsageError
from ddpm_jax.folder_images import Preprocessing
from ddpm_jax.workdir import LOCK_FILE
from experiments import folder as folder_experiment

DIGIT = np.zeros((16, 16, 1), np.uint8)
DIGIT[4:12, 6:10] = 200
DIGIT[2:4, 5:11] = 90


PRE16 = Preprocessing(16)


def _load(tmp_path, pil, name, pre=PRE16, **save):
    path = str(tmp_path / name)
    pil.save(path, **save)
    return folder_images.load_image(path, pre)


@pytest.mark.parametrize("kind", ["png", "rgb", "rgba", "wide", "png16"])
def test_lossless_kinds_decode_to_the_same_gray_image(tmp_path, kind):
    pil, ext = _folders.digit_image(DIGIT, kind)
    out = _load(tmp_path, pil, f"x{ext}", Preprocessing(16, channels=1))
    np.testing.assert_array_equal(out, DIGIT)


@pytest.mark.parametrize("ext", [".jpg", ".webp", ".bmp", ".tiff", ".gif"])
def test_every_format_pillow_reads(tmp_path, ext):
    save = {".webp": {"lossless": True}}.get(ext, {})
    out = _load(tmp_path, Image.fromarray(DIGIT[..., 0], "L"), f"x{ext}", **save)
    assert out.shape == (16, 16, 3) and folder_images.is_gray(out)
    tolerance = 32 if ext == ".jpg" else 0  # JPEG at quality 75
    assert np.abs(out[..., :1].astype(int) - DIGIT).max() <= tolerance


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3], rgba[4:, :, 3] = 255, 255, 0  # top red, bottom transparent
    out = _load(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png", Preprocessing(8))
    np.testing.assert_array_equal(out[:4].reshape(-1, 3), [[255, 0, 0]] * 32)
    np.testing.assert_array_equal(out[4:].reshape(-1, 3), [[255, 255, 255]] * 32)
    palette = Image.fromarray(np.eye(8, dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0  # index 0 (the zeros) transparent
    out = _load(tmp_path, palette, "p.png", Preprocessing(8), transparency=0)
    assert (out[~np.eye(8, dtype=bool)] == 255).all()


def test_exif_orientation_is_applied_and_wide_images_are_center_cropped(tmp_path):
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # the centre square is white
    pil = Image.fromarray(wide, "L")
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display: the image shows 10 wide, 30 high
    out = _load(tmp_path, pil, "r.jpg", Preprocessing(10, channels=1), exif=exif, quality=100)
    assert out.shape == (10, 10, 1) and out.min() > 200  # the centre of the rotated image
    crop = _load(tmp_path, pil, "r.png", Preprocessing(10, crop="random", channels=1))
    assert crop.shape == (10, 30, 1)  # short side 10, cropped per example in training
    rng = np.random.default_rng(0)
    windows = {
        folder_images.random_crop({"image": crop}, rng, size=10)["image"].sum() for _ in "x" * 20
    }
    assert len(windows) > 1


def test_upscale_false_refuses_small_images_and_unreadable_files_raise(tmp_path):
    with pytest.raises(folder_images.TooSmall, match="smaller than data.image_size=32"):
        _load(tmp_path, Image.fromarray(DIGIT[..., 0]), "s.png", Preprocessing(32, upscale=False))
    big = _load(tmp_path, Image.fromarray(DIGIT[..., 0]), "b.png", Preprocessing(32))
    assert big.shape == (32, 32, 3)
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    _folders.truncate(str(path))
    with pytest.raises(folder_images.Unreadable, match="truncated|broken|Error"):
        folder_images.load_image(str(path), Preprocessing(16))
    (tmp_path / "n.png").write_text("not an image")
    with pytest.raises(folder_images.Unreadable, match="UnidentifiedImageError"):
        folder_images.load_image(str(tmp_path / "n.png"), Preprocessing(16))


# ----------------------------------------------------------------------------- folders


def test_classes_flat_folders_and_layout_mistakes(tmp_path):
    _folders.write_digits_folder(str(tmp_path / "c"), limit=30)
    (tmp_path / "c" / ".hidden").mkdir()
    listing = folder_source.scan_folder(str(tmp_path / "c"))
    assert listing.classes == tuple(str(d) for d in range(10)) and len(listing.files) == 30
    assert list(listing.labels) == sorted(listing.labels)
    _folders.write_digits_folder(str(tmp_path / "flat"), limit=5, classes=False)
    flat = folder_source.scan_folder(str(tmp_path / "flat"))
    assert flat.classes == () and set(flat.labels) == {-1}
    (tmp_path / "flat" / "sub").mkdir()
    with pytest.raises(UsageError, match="beside sub-folders"):
        folder_source.scan_folder(str(tmp_path / "flat"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="has no image"):
        folder_source.scan_folder(str(tmp_path / "empty"))


def test_captions_from_metadata_jsonl_and_txt_files(tmp_path):
    root = tmp_path / "cap"
    _folders.write_digits_folder(str(root), limit=3, classes=False)
    names = sorted(os.listdir(root))
    lines = [json.dumps({"file_name": names[0], "text": "a zero"}), ""]
    (root / "metadata.jsonl").write_text("\n".join(lines))
    (root / (os.path.splitext(names[1])[0] + ".txt")).write_text("a one\n")
    listing = folder_source.scan_folder(str(root))
    assert folder_source.read_captions(listing) == ["a zero", "a one", None]
    prepared = folder_source.prepare_folder(str(root), Preprocessing(8), cache_dir=str(tmp_path))
    assert prepared.num_captions == 2
    (root / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(UsageError, match=r"metadata.jsonl line 1: file_name 'missing.png'"):
        folder_source.prepare_folder(str(root), Preprocessing(8), cache_dir=str(tmp_path))


def test_the_cache_is_reused_and_prepared_again_after_a_change(tmp_path):
    root, cache = str(tmp_path / "digits"), str(tmp_path / "cache")
    x, _ = _folders.write_digits_folder(root, limit=40)
    first = folder_source.prepare_folder(root, Preprocessing(16), cache_dir=cache)
    assert not first.from_cache and first.num_examples == 40 and first.channels == 1
    again = folder_source.prepare_folder(root, Preprocessing(16), cache_dir=cache)
    assert again.from_cache and again.path == first.path
    assert os.listdir(cache) == [os.path.basename(first.path)]  # no temporary folder left
    Image.fromarray(x[0, ..., 0]).save(os.path.join(root, "3", "new.png"))
    added = folder_source.prepare_folder(root, Preprocessing(16), cache_dir=cache)
    assert not added.from_cache and added.num_examples == 41 and added.path != first.path
    rgb = folder_source.prepare_folder(root, Preprocessing(16, channels=3), cache_dir=cache)
    assert not rgb.from_cache and rgb.image_shape == (16, 16, 3)
    assert rgb.source[0]["image"].shape == (16, 16, 3)


def test_unreadable_files_are_all_listed_or_skipped(tmp_path):
    root, cache = str(tmp_path / "digits"), str(tmp_path / "cache")
    _folders.write_digits_folder(root, limit=30)
    bad = [os.path.join(root, "1", "00001.png"), os.path.join(root, "2", "00002.png")]
    for path in bad:
        _folders.truncate(path)
    with pytest.raises(folder_source.UnreadableImagesError, match="2 unreadable") as e:
        folder_source.prepare_folder(root, Preprocessing(16), cache_dir=cache)
    assert [p for p, _ in e.value.unreadable] == bad and bad[0] in str(e.value)
    skipped = folder_source.prepare_folder(
        root, Preprocessing(16), cache_dir=cache, skip_unreadable=True
    )
    assert skipped.num_examples == 28 and [p for p, _ in skipped.unreadable] == bad


def _folder_config(root, cache, **data_fields):
    c = folder_experiment.get_config(16)
    c.data.dir, c.data.cache_dir = root, cache
    c.train.batch_size = 8
    for k, v in data_fields.items():
        c.data[k] = v
    return c


def test_batches_are_a_function_of_seed_and_step_and_split_over_processes(tmp_path):
    root, cache = str(tmp_path / "digits"), str(tmp_path / "cache")
    _folders.write_digits_folder(root, limit=20, kinds=("wide", "png"))
    for crop in ("center", "random"):
        config = _folder_config(root, cache, crop=crop)
        prepared = builders.prepare_folder(config)
        ds = builders.build_dataset(config, prepared)
        assert ds.num_classes == 10 and ds.image_shape == (16, 16, 1)
        again = builders.build_dataset(config)
        for step in (0, 3, 7):  # step 3 crosses the first epoch's end (20 examples)
            np.testing.assert_array_equal(ds.batch(step)["image"], again.batch(step)["image"])
        halves = [
            data.ImageDataset(
                prepared.source,
                name="folder",
                num_classes=10,
                global_batch_size=8,
                seed=0,
                process_index=p,
                process_count=2,
                augment=prepared.augment,
            ).batch(3)
            for p in range(2)
        ]
        whole = ds.batch(3)
        np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
        np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), whole["label"])


def test_config_fields_are_validated(tmp_path):
    c = folder_experiment.get_config(16)
    with pytest.raises(UsageError, match="data.dir=None"):
        validate(c)
    c.data.dir = str(tmp_path)
    validate(c)
    for field, value, match in [
        ("crop", "top", "data.crop='top'"),
        ("channels", 2, "data.channels=2"),
        ("upscale", None, "data.upscale=None"),
    ]:
        bad = folder_experiment.get_config(16)
        bad.data.dir, bad.data[field] = str(tmp_path), value
        with pytest.raises(UsageError, match=match):
            validate(bad)
    plain = default_config()
    validate(plain)  # the new fields leave other datasets alone


def test_recipes_follow_the_resolution():
    assert folder_experiment.get_config(16).model.ch_mult == (1, 2, 4)
    assert folder_experiment.get_config(32).model.ch_mult == (1, 2, 2, 2)
    assert folder_experiment.get_config(48).model.ch == 128  # the 32-pixel row
    assert folder_experiment.get_config(256).model.ch_mult == (1, 1, 2, 2, 4, 4)
    for size in (8, 16, 32, 64, 128, 256):
        c = folder_experiment.get_config(size)
        c.data.dir = "/x"
        validate(c)
        builders.check_image_shape(c, (size, size, 3))
    argv = ["folder.py", "--config.data.image_size", "128"]
    assert folder_experiment.recipe_of(argv)["image_size"] == 128
    assert folder_experiment.recipe_of(["p", "--config.data.image_size=x"])["image_size"] == 64


def test_one_class_with_labels_asked_for_is_one_line(tmp_path):
    root = tmp_path / "one"
    _folders.write_digits_folder(str(root), limit=12)
    for d in os.listdir(root):
        if d != "0":
            for f in os.listdir(root / d):
                os.replace(root / d / f, root / "0" / f)
            os.rmdir(root / d)
    config = _folder_config(str(root), str(tmp_path / "cache"))
    ds = builders.build_dataset(config)
    assert ds.num_classes == 1 and builders.build_model(config, 1).null_label is None
    config.model.class_conditional = True
    with pytest.raises(UsageError, match="has a single class"):
        builders.build_model(config, ds.num_classes)


def test_a_truncated_png_exits_2_naming_it_and_writes_only_the_report(tmp_path, capfd):
    root, workdir = str(tmp_path / "digits"), str(tmp_path / "run")
    _folders.write_digits_folder(root, limit=50)
    bad = os.path.join(root, "4", "00004.png")
    _folders.truncate(bad)
    argv = ["folder.py", f"--workdir={workdir}", f"--config.data.dir={root}"]
    argv += ["--config.data.image_size=16", f"--config.data.cache_dir={tmp_path / 'cache'}"]
    capfd.readouterr()
    t0 = time.time()
    with pytest.raises(SystemExit) as exit_info:
        folder_experiment.main(argv)
    assert time.time() - t0 < 30
    err = capfd.readouterr().err.strip().splitlines()
    assert exit_info.value.code == cli.EXIT_USAGE and len(err) == 1 and bad in err[0], err
    assert sorted(os.listdir(workdir)) == [".trainer.lock", folder_source.REPORT]
    report = json.load(open(os.path.join(workdir, folder_source.REPORT)))
    assert report["skipped"] is False and report["unreadable"][0]["path"] == bad


def test_a_run_is_loadable_from_its_record_without_the_folder(tmp_path):
    root = str(tmp_path / "digits")
    _folders.write_digits_folder(root, limit=20, kinds=("rgb",))
    config = _folder_config(root, str(tmp_path / "cache"), channels=3)
    prepared = builders.prepare_folder(config)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    folder_source.write_run_info(workdir, prepared)
    assert builders.data_spec(config, workdir) == ((16, 16, 3), 10)
    config.data.dir = str(tmp_path / "gone")
    assert builders.data_spec(config, workdir) == ((16, 16, 3), 10)
    with pytest.raises(UsageError, match="unknown here"):
        builders.data_spec(config)


def test_reference_statistics_come_from_the_prepared_images(tmp_path):
    from ddpm_jax.evaluation.evaluate import Evaluator
    from ddpm_jax.evaluation.reference import Extractor

    root, cache = str(tmp_path / "digits"), str(tmp_path / "cache")
    x, y = _folders.write_digits_folder(root, limit=30, kinds=("png",))
    prepared = folder_source.prepare_folder(root, Preprocessing(16), cache_dir=cache)
    seen = []

    def fn(imgs):
        seen.append(imgs)
        flat = imgs.reshape(len(imgs), -1).astype(np.float64)
        return flat[:, :4], np.ones((len(imgs), 1))

    extractor = Extractor(name="first4", dim=4, fn=fn, classes=False)
    kwargs = dict(data_dir=prepared.path, extractor=extractor, cache_dir=str(tmp_path / "stats"))
    ev = Evaluator("folder", (16, 16, 1), verbose=False, **kwargs)
    assert not ev.reference_cached and ev.reference.count == 30
    assert os.path.basename(prepared.path) in ev.cache_path  # one file per folder state
    order = np.lexsort((np.arange(len(y)), y))  # the folder's order: by class, then name
    np.testing.assert_array_equal(np.concatenate(seen), x[order])
    assert Evaluator("folder", (16, 16, 1), verbose=False, **kwargs).reference_cached
    with pytest.raises(UsageError, match="only its images"):
        list(ev.split_images("test"))


def test_a_run_refuses_a_folder_whose_classes_changed(tmp_path):
    root, workdir = str(tmp_path / "digits"), str(tmp_path / "run")
    _folders.write_digits_folder(root, limit=30)
    config = _folder_config(root, str(tmp_path / "cache"))
    os.makedirs(workdir)
    folder_source.write_run_info(workdir, builders.prepare_folder(config))
    before = sorted(os.listdir(workdir))
    os.rename(os.path.join(root, "9"), os.path.join(root, "nine"))
    with pytest.raises(UsageError, match=r"trained on classes \['0'.*'9'\].*'nine'"):
        folder_experiment.run(config, workdir)
    assert sorted(set(os.listdir(workdir)) - {LOCK_FILE}) == before
