"""Tests for ddpm_jax.data: digits, order per (seed, step), per-process slices, flips, the tfds
path on mocked data, in-memory arrays and the metadata-only image spec."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from ddpm_jax import data
from ddpm_jax.errors import UsageError

# ----------------------------------------------------------------------------- helpers


class IndexSource:
    """Example i: image [3, 4, 1] zero except pixel (0, 0) = i + 1 (mirrors to (0, 3)); label i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.zeros((3, 4, 1), np.uint8)
        image[0, 0, 0] = i + 1
        return {"image": image, "label": np.int64(i)}


def decode(batch):
    """(example indices, flipped flags) of a batch of IndexSource images."""
    u8 = np.rint((batch["image"].astype(np.float64) + 1.0) * 127.5).astype(np.int64)
    idx = u8[:, 0].max(axis=(1, 2)) - 1
    flipped = u8[:, 0, 3, 0] > 0
    assert (u8.sum(axis=(1, 2, 3)) == idx + 1).all()  # exactly one non-zero pixel
    np.testing.assert_array_equal(batch["label"], idx)  # labels travel with their image
    return idx, flipped


def index_dataset(n=10, batch=5, seed=0, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return data.ImageDataset(
        IndexSource(n), name="index", num_classes=n, global_batch_size=batch, seed=seed, **kw
    )


def stream(ds, num_steps):
    """Concatenated example indices and flip flags of steps 0 .. num_steps - 1."""
    parts = [decode(ds.batch(s)) for s in range(num_steps)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture
def mock_tfds(monkeypatch):
    """tfds mocked with 20 random examples per split, the datasets reported as prepared."""
    with tfds.testing.mock_data(num_examples=20):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        yield


# ----------------------------------------------------------------------------- digits


def test_digits_arrays_values_and_split():
    ref = load_digits()
    images, labels = data.digits_arrays("all")
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int32
    # round(v * 255 / 16) on the original 0..16 values: 0 → 0, 8 → 128 (127.5), 16 → 255.
    expected = np.array([round(v * 255 / 16) for v in range(17)])[ref.images.astype(int)]
    np.testing.assert_array_equal(images[..., 0], expected)
    np.testing.assert_array_equal(labels, ref.target)

    (tr_x, tr_y), (te_x, te_y) = data.digits_arrays("train"), data.digits_arrays("test")
    assert len(tr_x) == 1437 and len(te_x) == 360
    # The split partitions the dataset: rows of train + test are exactly the rows of "all".
    key = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y, strict=True))
    assert key(np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])) == key(images, labels)
    assert np.bincount(te_y, minlength=10).min() >= 35  # stratified: 36 ± 1 per class
    with pytest.raises(ValueError, match="split"):
        data.digits_arrays("validation")


def test_digits_through_pipeline_with_resize():
    ds = data.make_dataset(
        "digits",
        split="test",
        global_batch_size=12,
        seed=3,
        image_size=16,
        process_count=1,
        process_index=0,
    )
    assert (ds.name, ds.image_shape, ds.num_classes, ds.num_examples) == (
        "digits",
        (16, 16, 1),
        10,
        360,
    )
    assert ds.random_flip is False  # digits are not flip-invariant
    b = ds.batch(0)
    assert b["image"].shape == (12, 16, 16, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and -1.0 <= b["image"].min() < b["image"].max() <= 1.0


# ----------------------------------------------------------------------------- order


def test_scaling_is_exact_and_labels_match():
    ds = index_dataset(n=255, batch=255)
    b = ds.batch(0)
    idx, _ = decode(b)
    expected = np.stack([IndexSource(255)[i]["image"] for i in idx]) / 127.5 - 1.0
    np.testing.assert_allclose(b["image"], expected, rtol=0, atol=6e-8)  # float32 rounding
    assert b["image"].dtype == np.float32
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0  # 0 → -1 and 255 → 1 exactly


def test_each_epoch_is_a_new_permutation():
    idx, _ = stream(index_dataset(n=10, batch=5), 6)  # 3 epochs
    epochs = idx.reshape(3, 10)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(10))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(10))  # actually shuffled


def test_order_depends_only_on_seed_and_flat_position():
    # Batches of 4 straddle epoch boundaries (10 examples); the flat stream is the same as with
    # batches of 5, and the global batch of step s is positions [s*B, (s+1)*B).
    a, _ = stream(index_dataset(n=10, batch=4), 10)
    b, _ = stream(index_dataset(n=10, batch=5), 8)
    np.testing.assert_array_equal(a, b)
    c, _ = stream(index_dataset(n=10, batch=4, seed=1), 10)
    assert not np.array_equal(a, c)


def test_batch_is_a_pure_function_of_seed_and_step():
    ds1, ds2 = index_dataset(n=50, batch=8, seed=7), index_dataset(n=50, batch=8, seed=7)
    later = ds2.batch(123)  # computed first, on a fresh object
    for s in range(5):
        ds1.batch(s)
    for key in ("image", "label"):
        np.testing.assert_array_equal(ds1.batch(123)[key], later[key])
    assert ds1.steps_per_epoch == 50 / 8


def test_iterator_matches_batch_from_any_start():
    ds = index_dataset(n=23, batch=6, seed=2, random_flip=True, num_threads=3, prefetch_batches=2)
    it = ds.iterator(start_step=7)
    for s in range(7, 15):
        got = next(it)
        want = ds.batch(s)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_a_changed_batch_size_continues_the_stream_from_the_examples_seen():
    """Batches of 4 for 3 steps, then of 10 (on 2 processes) from the 12 examples seen: the same
    flat stream, flips included, as an unchanged run's (no example skipped or repeated)."""
    kw = dict(n=10, seed=3, random_flip=True)
    want = stream(index_dataset(batch=2, **kw), 31)
    first = stream(index_dataset(batch=4, **kw), 3)
    halves = [index_dataset(batch=10, process_index=p, process_count=2, **kw) for p in (0, 1)]
    iters = [ds.iterator(3, examples_seen=12) for ds in halves]
    rows = [decode(next(it)) for _ in range(5) for it in iters]  # process 0's rows first
    got = [np.concatenate([first[i], *(r[i] for r in rows)]) for i in (0, 1)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert want[1].any() and not want[1].all()  # flips do happen, keyed by flat position
    same = index_dataset(batch=6, **kw)  # the position of an unchanged run: batch(s) itself
    np.testing.assert_array_equal(
        next(same.iterator(3, examples_seen=18))["image"], same.batch(3)["image"]
    )


def test_num_examples_caps_the_epoch():
    ds = index_dataset(n=100, batch=5, num_examples=15)
    assert ds.num_examples == 15
    idx, _ = stream(ds, 6)
    for e in idx.reshape(2, 15):
        np.testing.assert_array_equal(np.sort(e), np.arange(15))


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("count", [2, 4])
def test_processes_get_contiguous_slices_of_the_same_global_batch(count):
    full = index_dataset(n=37, batch=8, seed=5, random_flip=True)
    parts = [
        index_dataset(n=37, batch=8, seed=5, random_flip=True, process_index=p, process_count=count)
        for p in range(count)
    ]
    assert parts[0].local_batch_size == 8 // count
    for s in (0, 4, 9):  # includes batches across epoch boundaries
        want = full.batch(s)
        got = [p.batch(s) for p in parts]
        for key in ("image", "label"):  # flips included: they do not depend on process count
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_each_process_reads_only_its_own_rows():
    class Recording(IndexSource):
        reads = []

        def __getitem__(self, i):
            self.reads.append(i)
            return super().__getitem__(i)

    src = Recording(37)
    ds = data.ImageDataset(
        src,
        name="rec",
        num_classes=None,
        global_batch_size=8,
        seed=1,
        process_index=1,
        process_count=4,
    )
    src.reads.clear()
    idx, _ = decode(ds.batch(6))
    assert sorted(src.reads) == sorted(idx.tolist()) and len(idx) == 2


def test_argument_validation_names_the_field():
    with pytest.raises(
        ValueError, match="global_batch_size=10 must be divisible by process_count=4"
    ):
        index_dataset(batch=10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        index_dataset(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        index_dataset(batch=0)
    with pytest.raises(ValueError, match="seed"):
        index_dataset(seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        index_dataset(image_size=(4, 0))
    with pytest.raises(ValueError, match="step"):
        index_dataset().batch(-1)


def test_unknown_or_unsuitable_dataset_names():
    with pytest.raises(ValueError, match="not_a_dataset_xyz"):
        data.make_dataset("not_a_dataset_xyz", global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no 'image' feature"):
        data.make_dataset("imdb_reviews", global_batch_size=2, seed=0)


# ----------------------------------------------------------------------------- flips


def test_flips_are_per_example_balanced_and_keyed_by_epoch():
    ds = index_dataset(n=100, batch=100, seed=11, random_flip=True)
    idx, flipped = stream(ds, 20)  # 20 epochs of 100
    assert 0.45 < flipped.mean() < 0.55  # 2000 fair coins: sd 0.011
    order = np.argsort(idx.reshape(20, 100), axis=1)  # positions sorted by example index
    per_epoch = np.take_along_axis(flipped.reshape(20, 100), order, axis=1)  # [epoch, example]
    assert 0.4 < (per_epoch[0] != per_epoch[1]).mean() < 0.6  # redrawn each epoch
    again, flipped_again = stream(index_dataset(n=100, batch=100, seed=11, random_flip=True), 20)
    np.testing.assert_array_equal(flipped, flipped_again)
    _, never = stream(index_dataset(n=100, batch=100, seed=11, random_flip=False), 3)
    assert not never.any()


def test_flip_mirrors_the_width_axis():
    ds = index_dataset(n=30, batch=30, seed=0, random_flip=True)
    b = ds.batch(0)
    idx, flipped = decode(b)
    assert flipped.any() and (~flipped).any()
    for image, i, f in zip(b["image"], idx, flipped, strict=True):
        src = IndexSource(30)[i]["image"] / 127.5 - 1.0
        np.testing.assert_allclose(image, src[:, ::-1] if f else src, rtol=0, atol=6e-8)


# ----------------------------------------------------------------------------- tfds (mocked)


def _source_table(name, split="train"):
    """image bytes → label of every example of the mocked tfds split."""
    source = tfds.data_source(name, split=split)
    return {source[i]["image"].tobytes(): int(source[i]["label"]) for i in range(len(source))}


def test_cifar10_on_mock_data_one_epoch_covers_each_example_once(mock_tfds):
    ds = data.make_dataset(
        "cifar10",
        global_batch_size=4,
        seed=0,
        random_flip=False,
        process_index=0,
        process_count=1,
    )
    assert (ds.image_shape, ds.num_classes, ds.num_examples) == ((32, 32, 3), 10, 20)
    table = _source_table("cifar10")
    assert len(table) == 20
    seen = []
    for s, b in zip(range(5), ds.iterator(0), strict=False):
        np.testing.assert_array_equal(b["image"], ds.batch(s)["image"])
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        u8 = np.rint((b["image"] + 1.0) * 127.5).astype(np.uint8)
        for image, label in zip(u8, b["label"], strict=True):
            assert table[image.tobytes()] == label
            seen.append(image.tobytes())
    assert sorted(seen) == sorted(table)  # one epoch = every example exactly once


def test_cifar10_on_mock_data_flips_by_default_and_slices_per_process(mock_tfds):
    kw = dict(global_batch_size=8, seed=4)
    full = data.make_dataset("cifar10", process_index=0, process_count=1, **kw)
    assert full.random_flip is True
    halves = [data.make_dataset("cifar10", process_index=p, process_count=2, **kw) for p in (0, 1)]
    table = _source_table("cifar10")
    n_flipped = 0
    for s in range(5):
        want = full.batch(s)
        np.testing.assert_array_equal(
            np.concatenate([h.batch(s)["image"] for h in halves]), want["image"]
        )
        for image in np.rint((want["image"] + 1.0) * 127.5).astype(np.uint8):
            mirrored = image[:, ::-1].tobytes()
            assert image.tobytes() in table or mirrored in table
            n_flipped += image.tobytes() not in table
    assert 0 < n_flipped < 40


def test_mnist_on_mock_data_is_grayscale_without_default_flips(mock_tfds):
    ds = data.make_dataset(
        "mnist", split="test", global_batch_size=5, seed=0, process_count=1, process_index=0
    )
    assert ds.image_shape == (28, 28, 1) and ds.random_flip is False
    assert ds.batch(3)["image"].shape == (5, 28, 28, 1)


def test_image_spec_from_metadata_alone(mock_tfds, tmp_path):
    """The shape and classes make_dataset would produce, without reading or preparing data."""
    assert data.image_spec("digits") == ((8, 8, 1), 10)
    assert data.image_spec("digits", image_size=32) == ((32, 32, 1), 10)
    assert data.image_spec("cifar10", data_dir=str(tmp_path)) == ((32, 32, 3), 10)
    assert list(tmp_path.iterdir()) == []  # nothing prepared
    with pytest.raises(UsageError, match="no_such_dataset"):
        data.image_spec("no_such_dataset")


def test_array_dataset_of_float_arrays_batches_like_every_dataset():
    """In-memory float32 arrays (latents) are used as they are, with the same (seed, step)
    batching, per-process slices and label checks."""
    latents = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones(
        (1, 2, 2, 3), np.float32
    )
    labels = np.arange(10, dtype=np.int32) % 3
    ds = data.array_dataset(latents, labels, num_classes=3, global_batch_size=4, seed=1)
    assert ds.image_shape == (2, 2, 3) and ds.local_batch_size == 4
    flat = np.concatenate([ds.batch(s)["image"][:, 0, 0, 0] for s in range(5)])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) != list(flat[:10])
    it = ds.iterator(2)
    for s in (2, 3, 4):
        b = next(it)
        np.testing.assert_array_equal(b["image"], ds.batch(s)["image"])
        np.testing.assert_array_equal(b["label"], b["image"][:, 0, 0, 0].astype(int) % 3)
    halves = [
        data.array_dataset(
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
        data.array_dataset(latents, labels, num_classes=2, global_batch_size=4, seed=0)
