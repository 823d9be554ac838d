"""Tests for experiments.data: real behaviour on small files made here, plus the real
data sets in ../shared/data when present (marked ``data``). No TensorFlow is imported."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from experiments import data, image_folders
from experiments.data import DataError, Dataset, load_dataset, read_idx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides conftest's fixture of the same name, which imports Keras (TensorFlow)
    for every test: data loading needs neither, and these tests stay fast."""
    yield


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path_factory):
    """Every test: its own cache, no default data dir, and no network at all."""
    monkeypatch.setenv("NICS_FIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("NICS_FIX_DATA", str(tmp_path_factory.mktemp("empty") / "absent"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", Path("/nonexistent/fashion-mnist"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    def no_keras(name):
        raise AssertionError(f"a test reached the Keras fallback for {name}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(data, "_keras_load", no_keras)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_unit_range():
    ds = load_dataset({"name": "digits"})
    assert isinstance(ds, Dataset)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert ds.class_names == [str(i) for i in range(10)]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == (8, 8, 1) and len(x) == len(y)
        assert x.min() == 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) <= set(range(10))
    assert ds.x_train.max() == 1.0  # 16 / 16 exactly
    # Pixel values are multiples of 1/16.
    assert np.array_equal(ds.x_train * 16, np.round(ds.x_train * 16))


def test_digits_split_sizes_and_stratified_test():
    ds = load_dataset({"name": "digits", "val_split": 0.1})
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (1293, 144, 360)
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == 1797
    counts = np.bincount(ds.y_test, minlength=10)
    assert (counts > 0).all()
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class's ~180


def test_digits_seeded():
    a = load_dataset({"name": "digits", "seed": 3})
    b = load_dataset({"name": "digits", "seed": 3})
    c = load_dataset({"name": "digits", "seed": 4})
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.x_val, c.x_val)
    # The test set is fixed: every seed evaluates on the same images.
    assert np.array_equal(a.x_test, c.x_test)
    # Train and val partition the training pool (the whole of it with val_split=0).
    pool = load_dataset({"name": "digits", "val_split": 0, "seed": 9}).x_train
    assert multiset(np.concatenate([a.x_train, a.x_val])) == multiset(pool)


def multiset(x):
    rows, counts = np.unique(x.reshape(len(x), -1), axis=0, return_counts=True)
    return rows.tolist(), counts.tolist()


def test_accepts_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"name": "synthetic", "shape": [2, 2, 3], "seed": "${n}",
                                      "n": 1, "num_examples": 20})
    ds = load_dataset(cfg)
    assert ds.input_shape == (2, 2, 3)
    assert np.array_equal(ds.x_train, load_dataset(
        {"name": "synthetic", "shape": [2, 2, 3], "seed": 1, "num_examples": 20}).x_train)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("name", data.DATASETS)
def test_conf_file(name):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    assert cfg.name == name
    assert set(cfg) <= set(data.CONFIG_KEYS)
    assert {"path", "val_split", "limit", "test_limit", "seed", "flatten", "normalize"} <= set(cfg)
    assert (cfg.val_split, cfg.limit, cfg.flatten, cfg.normalize) == (0.1, None, False, "unit")
    assert cfg.seed == 0  # follows trainer.seed when composed; 0 alone
    if name in ("digits", "synthetic"):  # the others would look for files
        ds = load_dataset(omegaconf.OmegaConf.merge(cfg, {"limit": 50}))
        assert len(ds.x_train) + len(ds.x_val) == 50


def test_val_split_zero_gives_empty_val_with_shape():
    ds = load_dataset({"name": "digits", "val_split": 0})
    assert ds.x_val.shape == (0, 8, 8, 1) and ds.y_val.shape == (0,)
    assert ds.x_val.dtype == np.float32 and ds.y_val.dtype == np.int64
    assert len(ds.x_train) == 1437


def test_limit_and_test_limit():
    ds = load_dataset({"name": "digits", "limit": 100, "val_split": 0.2})
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (80, 20, 100)
    ds = load_dataset({"name": "digits", "limit": 100, "test_limit": 7})
    assert len(ds.x_test) == 7
    ds = load_dataset({"name": "digits", "limit": 10_000})  # a cap, not a target
    assert len(ds.x_train) + len(ds.x_val) == 1437 and len(ds.x_test) == 360
    a = load_dataset({"name": "digits", "limit": 50, "seed": 1})
    b = load_dataset({"name": "digits", "limit": 50, "seed": 2})
    assert not np.array_equal(a.x_train, b.x_train)


def test_flatten():
    ds = load_dataset({"name": "digits", "flatten": True})
    assert ds.input_shape == (64,)
    assert ds.x_train.shape[1:] == ds.x_val.shape[1:] == ds.x_test.shape[1:] == (64,)
    ref = load_dataset({"name": "digits"})
    assert np.array_equal(ds.x_train, ref.x_train.reshape(len(ref.x_train), 64))
    empty_val = load_dataset({"name": "digits", "flatten": True, "val_split": 0})
    assert empty_val.x_val.shape == (0, 64)


def test_standard_normalization_uses_train_stats_only():
    cfg = {"name": "synthetic", "shape": [4, 4, 3], "num_examples": 300, "seed": 5}
    ds = load_dataset(dict(cfg, normalize="standard"))
    mean = ds.x_train.mean(axis=(0, 1, 2))
    std = ds.x_train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, 0, atol=1e-5)
    np.testing.assert_allclose(std, 1, atol=1e-5)
    raw = load_dataset(dict(cfg, normalize="none"))
    m = raw.x_train.mean(axis=(0, 1, 2), dtype=np.float64)
    s = raw.x_train.std(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - m) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_val, (raw.x_val - m) / s, rtol=1e-5, atol=1e-5)
    # The test set was not used for the stats: its mean is not forced to 0.
    assert np.abs(ds.x_test.mean(axis=(0, 1, 2))).max() > 1e-3


def test_standard_normalization_digits_constant_pixels_ok():
    ds = load_dataset({"name": "digits", "normalize": "standard"})
    assert np.isfinite(ds.x_train).all()
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "0.1", True, None])
def test_bad_val_split(bad):
    with pytest.raises(DataError, match=r"val_split.*\[0, 1\)"):
        load_dataset({"name": "digits", "val_split": bad})


def test_val_split_leaving_no_training_examples():
    with pytest.raises(DataError, match="leaves no training examples"):
        load_dataset({"name": "digits", "limit": 1, "val_split": 0.9})


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as info:
        load_dataset({"name": "imagenet"})
    message = str(info.value)
    assert "'imagenet'" in message
    for name in ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic"):
        assert name in message


@pytest.mark.parametrize("key,value", [("normalize", "minmax"), ("limit", 0), ("limit", 2.5),
                                       ("seed", -1), ("flatten", "yes"), ("shape", [8, 0])])
def test_bad_options(key, value):
    with pytest.raises(DataError, match=f"data.{key}"):
        load_dataset({"name": "synthetic", key: value})


def test_module_does_not_import_tensorflow():
    code = ("import sys, experiments.data as d; "
            "assert not {'tensorflow', 'keras', 'sklearn', 'omegaconf'} & set(sys.modules), "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_seed():
    cfg = {"name": "synthetic", "shape": [4, 4, 2], "num_classes": 3, "num_examples": 100,
           "test_examples": 40, "val_split": 0.2, "seed": 7}
    ds = load_dataset(cfg)
    assert ds.input_shape == (4, 4, 2) and ds.num_classes == 3 and ds.class_names is None
    assert (ds.x_train.shape, ds.x_val.shape, ds.x_test.shape) == \
        ((80, 4, 4, 2), (20, 4, 4, 2), (40, 4, 4, 2))
    assert set(np.unique(ds.y_train)) == {0, 1, 2}
    again = load_dataset(cfg)
    assert np.array_equal(ds.x_train, again.x_train) and np.array_equal(ds.y_test, again.y_test)
    other = load_dataset(dict(cfg, seed=8))
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_defaults():
    ds = load_dataset({"name": "synthetic"})
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_val) == 512 and len(ds.x_test) == 128


def test_synthetic_is_learnable():
    ds = load_dataset({"name": "synthetic", "seed": 0})
    x = ds.x_train.reshape(len(ds.x_train), -1)
    x_test = ds.x_test.reshape(len(ds.x_test), -1)
    # Least squares on one-hot targets, with a bias column.
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], np.eye(10)[ds.y_train], rcond=None)
    accuracy = (np.argmax(np.c_[x_test, np.ones(len(x_test))] @ w, axis=1) == ds.y_test).mean()
    assert accuracy > 0.5, accuracy  # chance is 0.1
    # Nearest centroid too.
    centroids = np.stack([x[ds.y_train == k].mean(axis=0) for k in range(10)])
    nearest = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == ds.y_test).mean() > 0.5


# --------------------------------------------------------------------------- IDX files


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file; gzip it when the name ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_dir(directory: Path, gz: bool, n_train=5, n_test=3, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["x_train"][0, 0, 0] = 255  # the maximum pixel appears
    suffix = ".gz" if gz else ""
    for key, stem in data.IDX_FILES.items():
        write_idx(directory / f"{stem}{suffix}", arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_exact_values(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz)
    ds = load_dataset({"name": "mnist", "path": str(tmp_path), "val_split": 0})
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    expected = arrays["x_train"][..., None].astype(np.float32) / np.float32(255)
    assert np.array_equal(ds.x_train, expected)
    assert ds.x_train[0, 0, 0, 0] == 1.0
    assert np.array_equal(ds.x_test, arrays["x_test"][..., None].astype(np.float32) / 255)
    assert np.array_equal(ds.y_train, arrays["y_train"]) and ds.y_train.dtype == np.int64
    assert np.array_equal(ds.y_test, arrays["y_test"])


def test_idx_fashion_mnist_and_path_expansion(tmp_path, monkeypatch):
    arrays = make_idx_dir(tmp_path / "fm", gz=True)
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    ds = load_dataset({"name": "fashion_mnist", "path": "$MY_DATA/fm", "val_split": 0})
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert np.array_equal(ds.y_train, arrays["y_train"])


def test_idx_read_idx_directly(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    path = write_idx(tmp_path / "labels.gz", labels)
    assert np.array_equal(read_idx(path, ndim=1), labels)


def test_idx_truncated_file_names_it(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset({"name": "mnist", "path": tmp_path})
    assert str(bad) in str(info.value)


def test_idx_truncated_gzip_names_it(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(DataError) as info:
        load_dataset({"name": "mnist", "path": tmp_path})
    assert str(bad) in str(info.value)


def test_idx_wrong_magic_names_it(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    write_idx(bad, np.zeros((5, 1, 1), np.uint8))  # an images file where labels belong
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801") as info:
        load_dataset({"name": "mnist", "path": tmp_path})
    assert str(bad) in str(info.value)


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_dataset({"name": "mnist", "path": tmp_path})


def test_idx_missing_files_clear_error_without_network(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # one of four present
    calls = []

    def keras_fails(name):
        calls.append(name)
        raise OSError("no network in tests")

    monkeypatch.setattr(data, "_keras_load", keras_fails)
    with pytest.raises(DataError) as info:
        load_dataset({"name": "mnist", "path": str(tmp_path)})
    message = str(info.value)
    assert calls == ["mnist"]  # the fake ran instead of keras.datasets
    assert str(tmp_path) in message
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert stem in message
    assert "data.path=" in message and "no network in tests" in message
    assert isinstance(info.value.__cause__, OSError)


def test_fashion_mnist_missing_mentions_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_keras_load", lambda name: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError) as info:
        load_dataset({"name": "fashion_mnist"})
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/nonexistent/fashion-mnist" in message  # the Debian directory was searched


def test_keras_fallback_result_is_used(monkeypatch):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, (20, 1)), rng.integers(0, 10, (5, 1))  # Keras' (N, 1)
    monkeypatch.setattr(data, "_keras_load", lambda name: ((x_train, y_train), (x_test, y_test)))
    ds = load_dataset({"name": "cifar10", "val_split": 0})
    assert ds.class_names[0] == "airplane" and ds.input_shape == (32, 32, 3)
    assert np.array_equal(ds.y_train, y_train[:, 0]) and ds.y_test.shape == (5,)
    assert np.array_equal(ds.x_test, x_test.astype(np.float32) / 255)


# --------------------------------------------------------------------------- image folders

CLASSES = ["dog", "airplane", "cat"]  # written out of order: labels must sort them


def make_image_folder(root: Path, per_class=(3, 2), seed=0):
    """root/{train,test}/<class>/<i>.png with known pixels; returns {split: (x, y)}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "test"), per_class):
        xs, ys = [], []
        for label, name in enumerate(sorted(CLASSES)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                xs.append(pixels)
                ys.append(label)
        out[split] = (np.stack(xs), np.array(ys))
    return out


def make_tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def image_folder(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "mini" / "cifar-mini"
    return root, make_image_folder(root)


def test_image_folder_labels_and_exact_pixels(image_folder):
    root, expected = image_folder
    ds = load_dataset({"name": "cifar10", "path": str(root), "val_split": 0})
    assert ds.class_names == ["airplane", "cat", "dog"] and ds.num_classes == 3
    assert ds.input_shape == (32, 32, 3)
    x, y = expected["train"]
    assert np.array_equal(ds.y_train, y)
    assert np.array_equal(ds.x_train, x.astype(np.float32) / np.float32(255))  # PNG is lossless
    assert np.array_equal(ds.x_test, expected["test"][0].astype(np.float32) / np.float32(255))
    assert np.array_equal(ds.y_test, expected["test"][1])


def test_image_folder_parent_folder(image_folder):
    root, expected = image_folder
    ds = load_dataset({"name": "cifar10", "path": root.parent, "val_split": 0, "normalize": "none"})
    assert np.array_equal(ds.x_train, expected["train"][0])


def test_image_folder_targz_and_cache_reuse(image_folder, tmp_path, monkeypatch):
    root, expected = image_folder
    archive = make_tar(root, tmp_path / "cifar-mini.tar.gz")
    cfg = {"name": "cifar10", "path": str(archive), "val_split": 0, "normalize": "none"}
    first = load_dataset(cfg)
    assert np.array_equal(first.x_train, expected["train"][0])
    assert np.array_equal(first.y_test, expected["test"][1])
    cache = Path(os.environ["NICS_FIX_CACHE"])
    assert len(list(cache.glob("cifar-mini-*.images.npz"))) == 1  # extracted once
    assert len(list(cache.glob("cifar-mini-*.train.npz"))) == 1   # decoded once

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    extract, decode = image_folders._extract_archive, image_folders._decode_image
    monkeypatch.setattr(image_folders, "_extract_archive", fail)
    monkeypatch.setattr(image_folders, "_decode_image", fail)
    second = load_dataset(cfg)
    assert np.array_equal(second.x_train, first.x_train)
    assert np.array_equal(second.x_test, first.x_test)
    # A capped load is served from the decoded cache, as the same subset as without it.
    capped = load_dataset(dict(cfg, limit=4))
    monkeypatch.setattr(image_folders, "_extract_archive", extract)
    monkeypatch.setattr(image_folders, "_decode_image", decode)
    monkeypatch.setenv("NICS_FIX_CACHE", str(tmp_path / "fresh-cache"))
    assert np.array_equal(capped.x_train, load_dataset(dict(cfg, limit=4)).x_train)


def test_image_folder_archive_in_parent_folder(image_folder, tmp_path):
    root, expected = image_folder
    holder = tmp_path / "holder"
    holder.mkdir()
    make_tar(root, holder / "images.tgz")
    ds = load_dataset({"name": "cifar10", "path": holder, "val_split": 0, "normalize": "none"})
    assert np.array_equal(ds.x_test, expected["test"][0])


def test_image_folder_limit_decodes_only_the_subset(image_folder, monkeypatch):
    root, _ = image_folder
    decoded = []
    real = image_folders._decode_image

    def counting(*args):
        decoded.append(args[2])
        return real(*args)

    monkeypatch.setattr(image_folders, "_decode_image", counting)
    ds = load_dataset({"name": "cifar10", "path": root, "limit": 4, "test_limit": 2,
                       "val_split": 0.25})
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (3, 1, 2)
    assert len(decoded) == 6


def test_image_folder_wrong_size_names_file(image_folder):
    from PIL import Image

    root, _ = image_folder
    bad = root / "train" / "cat" / "0001.png"
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="32x16") as info:
        load_dataset({"name": "cifar10", "path": root})
    assert str(bad) in str(info.value)


def test_image_folder_undecodable_names_file(image_folder):
    root, _ = image_folder
    bad = root / "test" / "dog" / "0000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        load_dataset({"name": "cifar10", "path": root})
    assert str(bad) in str(info.value)


def test_cifar10_missing_clear_error(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "_keras_load",
                        lambda name: calls.append(name) or (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError) as info:
        load_dataset({"name": "cifar10", "path": tmp_path})
    message = str(info.value)
    assert calls == ["cifar10"]
    assert str(tmp_path) in message and "train/ and test/" in message
    assert "data.path=" in message and ".tar.gz" in message


# --------------------------------------------------------------------------- real data


# Read before the autouse fixture points NICS_FIX_DATA elsewhere.
_ORIGINAL_DATA = os.environ.get("NICS_FIX_DATA")
REAL = Path(_ORIGINAL_DATA) if _ORIGINAL_DATA else REPO / ".." / "shared" / "data"


@pytest.mark.data
def test_real_mnist(monkeypatch):
    if not (REAL / "mnist").is_dir():
        pytest.skip(f"no MNIST files in {REAL / 'mnist'} (set NICS_FIX_DATA)")
    monkeypatch.setenv("NICS_FIX_DATA", str(REAL))  # path: null finds <data>/mnist
    ds = load_dataset({"name": "mnist", "val_split": 0})
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train[0] == 5
    assert np.bincount(ds.y_train).tolist()[:2] == [5923, 6742]
    assert np.bincount(ds.y_test).tolist()[:2] == [980, 1135]
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


@pytest.mark.data
def test_real_cifar10_with_limit(monkeypatch):
    archive = REAL / "cifar10" / "cifar10-images.tar.gz"
    if not archive.is_file():
        pytest.skip(f"no CIFAR-10 archive at {archive} (set NICS_FIX_DATA)")
    decoded = []
    real = image_folders._decode_image
    monkeypatch.setattr(image_folders, "_decode_image", lambda *a: decoded.append(1) or real(*a))
    ds = load_dataset({"name": "cifar10", "path": str(archive), "limit": 50})
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer",
                              "dog", "frog", "horse", "ship", "truck"]
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (45, 5, 50)
    assert ds.x_train.shape[1:] == (32, 32, 3) and 0 <= ds.x_train.min() < ds.x_train.max() <= 1
    assert len(decoded) == 100  # only the chosen images were decoded
