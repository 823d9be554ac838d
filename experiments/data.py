"""Data sets for the experiments, as plain NumPy arrays (no TensorFlow needed).

Example::

    >>> from experiments.data import load_dataset
    >>> ds = load_dataset({"name": "digits", "val_split": 0.1, "seed": 0})
    >>> ds.x_train.shape, ds.x_val.shape, ds.x_test.shape, ds.input_shape
    ((1293, 8, 8, 1), (144, 8, 8, 1), (360, 8, 8, 1), (8, 8, 1))

``load_dataset`` takes the ``data`` group of the Hydra config (``conf/data/*.yaml``)
as a plain dict or an OmegaConf ``DictConfig``:

``name``
    ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10`` or ``synthetic``.
``path``
    Directory (or, for ``cifar10``, archive) holding the files; ``null`` searches the
    default places below. ``~`` and ``$VARS`` are expanded.
``val_split`` (0.1)
    Fraction of the training set held out for validation, in [0, 1). 0 gives empty
    validation arrays (with the right trailing shape).
``limit`` / ``test_limit`` (``null``)
    Caps on the number of training examples (applied *before* the validation split)
    and test examples. ``test_limit`` defaults to ``limit``. For ``cifar10`` the cap is
    applied to the file list, so only the chosen images are decoded.
``seed`` (0)
    Seeds subsampling and the validation split (and ``synthetic``'s sampling).
    Subsets keep the original order of the examples; shuffling is the trainer's job.
``flatten`` (``false``)
    Reshape examples to vectors: ``input_shape`` becomes ``(prod(input_shape),)``.
``normalize`` (``unit``)
    * ``unit``: pixels divided by the largest possible pixel value (16 for ``digits``,
      255 otherwise), into [0, 1]. ``synthetic`` inputs are already standard Gaussian
      and have no pixel scale, so ``unit`` leaves them as they are.
    * ``standard``: per channel (last axis), subtract the mean and divide by the
      standard deviation, both computed on the training split only (after the
      validation split) and applied to all splits. A constant channel is only
      centred.
    * ``none``: the raw values as float32.
``num_examples`` (512), ``test_examples`` (128), ``shape`` ([8, 8, 1]), ``num_classes`` (10)
    ``synthetic`` only. Inputs are seeded standard Gaussians; the label is the argmax
    of a fixed random linear projection (fixed per ``shape``/``num_classes``, the
    same for every ``seed``), and each input is then shifted one unit along its
    class's direction (a margin that keeps the label), so a small model learns it.

Where the files are looked for, in order:

* ``digits``: scikit-learn's bundled copy (1797 images, 8x8, pixels 0..16). There is
  no official test split: a stratified 20% (360 images) is held out with a fixed
  seed, so every run tests on the same images whatever ``seed`` is.
* ``mnist``, ``fashion_mnist``: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
  (each plain or ``.gz``) in ``path``; when ``path`` is null, in
  ``default_data_dir()/<name>``; for ``fashion_mnist`` also in
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
* ``cifar10``: an image folder ``<root>/{train,test}/<class>/*.{jpg,jpeg,png}``
  (labels = class folders in alphabetical order); ``path`` may be that root, its
  parent folder, or a ``.tar.gz`` of it (also a folder holding exactly one such
  archive). When ``path`` is null: ``default_data_dir()/cifar10/cifar10-images.tar.gz``.
  An archive is extracted once into the cache directory (``$NICS_FIX_CACHE``, else
  ``~/.cache/nics_fix``); decoded full splits are cached there as ``.npz`` files,
  keyed by the source and its file list, so later loads skip JPEG decoding. (A file
  changed in place under the same name in a user folder is not noticed: delete the
  cache file to re-decode.)
* Last resort for ``mnist``, ``fashion_mnist`` and ``cifar10``: ``keras.datasets``
  (its cache ``~/.keras/datasets``, else a download). When that fails too, a
  ``DataError`` says what was searched and where to put the files. The download
  gives up after ``$NICS_FIX_DOWNLOAD_TIMEOUT`` seconds (default 60) without an
  answer from the network; ``NICS_FIX_OFFLINE=1`` turns it off (Keras' cache only).

``default_data_dir()`` is ``$NICS_FIX_DATA`` or ``<repo>/../shared/data``.
"""

from __future__ import annotations

import gzip
import logging
import numbers
import os
import socket
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")
NORMALIZATIONS = ("unit", "standard", "none")
CONFIG_KEYS = ("name", "path", "val_split", "limit", "test_limit", "seed", "flatten", "normalize",
               "num_examples", "test_examples", "shape", "num_classes")

# The standard IDX file names (MNIST and Fashion-MNIST use the same ones).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGITS_CLASSES = [str(i) for i in range(10)]
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed: the digits test set must not move with `seed`
_SYNTHETIC_PROJECTION_SEED = 1234
_SYNTHETIC_MARGIN = 1.0

# Independent random streams per step, so e.g. changing `limit` does not change
# which examples go to validation for reasons unrelated to the cap.
_STREAM_TRAIN_LIMIT, _STREAM_TEST_LIMIT, _STREAM_VAL = 1, 2, 3
_STREAM_SYNTHETIC = 4


class DataError(RuntimeError):
    """A data set could not be loaded; the message says what, where, and how to fix it."""


@dataclass(eq=False)
class Dataset:
    """A loaded data set: float32 inputs, int64 labels, already split and normalized.

    >>> ds = load_dataset({"name": "synthetic", "num_examples": 100})
    >>> ds
    Dataset('synthetic', train=90, val=10, test=128, input_shape=(8, 8, 1), num_classes=10)
    """

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_val: np.ndarray = field(repr=False)
    y_val: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    input_shape: tuple
    class_names: list[str] | None = None

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, val={len(self.x_val)}, "
                f"test={len(self.x_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


@dataclass(frozen=True)
class _Options:
    name: str
    path: Path | None
    val_split: float
    limit: int | None
    test_limit: int | None
    seed: int
    flatten: bool
    normalize: str
    num_examples: int
    test_examples: int
    shape: tuple
    num_classes: int


@dataclass
class _Raw:
    """What a loader returns: un-normalized arrays (N, H, W, C), caps already applied."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float | None  # largest possible pixel value; None: no pixel scale
    class_names: list[str] | None
    num_classes: int


# --------------------------------------------------------------------------- public API


def default_data_dir() -> Path | None:
    """``$NICS_FIX_DATA``, else ``<repo>/../shared/data``; None when it is not a directory.

    >>> default_data_dir()  # doctest: +SKIP
    PosixPath('/work/shared/data')
    """
    env = os.environ.get("NICS_FIX_DATA")
    if env:
        directory = Path(os.path.expandvars(env)).expanduser()
    else:
        directory = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return directory if directory.is_dir() else None


def cache_dir() -> Path:
    """Where archives are extracted and decoded images cached: ``$NICS_FIX_CACHE`` or
    ``~/.cache/nics_fix``."""
    env = os.environ.get("NICS_FIX_CACHE")
    return Path(os.path.expandvars(env)).expanduser() if env else Path.home() / ".cache" / "nics_fix"


def load_dataset(cfg: Mapping) -> Dataset:
    """Load, subsample, split and normalize the data set described by ``cfg``.

    >>> ds = load_dataset({"name": "mnist", "path": "~/data/mnist", "limit": 1000})  # doctest: +SKIP
    >>> ds.x_train.shape, ds.x_test.shape  # doctest: +SKIP
    ((900, 28, 28, 1), (1000, 28, 28, 1))

    Raises DataError (with what went wrong and how to fix it) for bad options and for
    missing or damaged files.
    """
    opts = _parse_options(cfg)
    raw = _LOADERS[opts.name](opts)
    x_train, y_train, x_val, y_val = _split_validation(raw.x_train, raw.y_train, opts)
    x_train, x_val, x_test = _normalize(opts.normalize, raw.scale, x_train, x_val, raw.x_test)
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    if opts.flatten:
        input_shape = (int(np.prod(input_shape)),)
        x_train, x_val, x_test = (_rows(x) for x in (x_train, x_val, x_test))
    return Dataset(
        name=opts.name,
        x_train=x_train, y_train=y_train.astype(np.int64),
        x_val=x_val, y_val=y_val.astype(np.int64),
        x_test=x_test, y_test=raw.y_test.astype(np.int64),
        num_classes=raw.num_classes,
        input_shape=input_shape,
        class_names=list(raw.class_names) if raw.class_names is not None else None,
    )


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain, or gzip when the name ends in .gz).

    ``ndim`` (3 for images, 1 for labels) fixes the expected magic number
    (0x00000803 / 0x00000801). Raises DataError naming the file when it is damaged.

    >>> read_idx("mnist/train-labels-idx1-ubyte.gz", ndim=1).shape  # doctest: +SKIP
    (60000,)
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"Cannot read IDX file {path}: {e}. The file is damaged or "
                        f"truncated: replace it with a fresh copy.") from e
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, not even a header. "
                        f"Replace it with a fresh copy.")
    magic = int.from_bytes(data[:4], "big")
    expected = 0x800 | ndim if ndim is not None else None
    # Bytes 0-1 are zero, byte 2 is the type (0x08: unsigned byte), byte 3 the rank.
    if (expected is not None and magic != expected) or data[0:3] != b"\x00\x00\x08" or data[3] == 0:
        want = f"0x{expected:08X}" if expected is not None else "0x000008NN"
        raise DataError(f"{path} is not an IDX file of unsigned bytes: magic number "
                        f"0x{magic:08X}, expected {want}. Is it the right file, and "
                        f"decompressed only once?")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header. Replace it.")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) != header + size:
        raise DataError(f"IDX file {path} is truncated or damaged: its header promises "
                        f"{header + size} bytes (shape {dims}), the file has {len(data)}. "
                        f"Replace it with a fresh copy.")
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(dims)


# --------------------------------------------------------------------------- options


def _parse_options(cfg: Mapping) -> _Options:
    if not isinstance(cfg, Mapping):
        raise DataError(f"The data config must be a mapping (dict or DictConfig), "
                        f"got {type(cfg).__name__}.")
    values = {}
    for key in cfg:  # works for DictConfig too, resolving interpolations on access
        try:
            values[str(key)] = cfg[key]
        except Exception as e:  # e.g. omegaconf's MissingMandatoryValue for '???'
            raise DataError(f"data.{key}: cannot read the value: {e}") from e
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:  # a warning, not an error: other parts of the platform may add keys
        log.warning("data config: ignoring unknown key(s) %s (known: %s)",
                    ", ".join(unknown), ", ".join(CONFIG_KEYS))

    name = values.get("name")
    if name not in DATASETS:
        raise DataError(f"Unknown data set name {name!r}: choose one of {', '.join(DATASETS)} "
                        f"(e.g. data=mnist on the command line).")

    val_split = values.get("val_split", 0.1)
    if isinstance(val_split, bool) or not isinstance(val_split, numbers.Real) \
            or not 0 <= val_split < 1:
        raise DataError(f"data.val_split must be a number in [0, 1) (the fraction of the "
                        f"training set held out for validation), got {val_split!r}.")

    normalize = values.get("normalize", "unit")
    if normalize not in NORMALIZATIONS:
        raise DataError(f"data.normalize must be one of {', '.join(NORMALIZATIONS)}, "
                        f"got {normalize!r}.")

    flatten = values.get("flatten", False)
    if not isinstance(flatten, (bool, np.bool_)):
        raise DataError(f"data.flatten must be true or false, got {flatten!r}.")

    limit = _int_option(values, "limit", None, minimum=1, optional=True)
    test_limit = _int_option(values, "test_limit", None, minimum=1, optional=True)
    shape = values.get("shape", (8, 8, 1))
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not shape \
            or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                       for d in shape):
        raise DataError(f"data.shape must be a non-empty list of positive integers, "
                        f"e.g. [8, 8, 1], got {shape!r}.")

    path = values.get("path")
    if path is not None and str(path).strip():
        path = Path(os.path.expandvars(os.path.expanduser(str(path))))
    else:
        path = None

    return _Options(
        name=name, path=path, val_split=float(val_split),
        limit=limit, test_limit=test_limit if test_limit is not None else limit,
        seed=_int_option(values, "seed", 0, minimum=0),
        flatten=bool(flatten), normalize=normalize,
        num_examples=_int_option(values, "num_examples", 512, minimum=1),
        test_examples=_int_option(values, "test_examples", 128, minimum=1),
        shape=tuple(int(d) for d in shape),
        num_classes=_int_option(values, "num_classes", 10, minimum=2),
    )


def _int_option(values, key, default, minimum, optional=False):
    value = values.get(key, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        null = " or null" if optional else ""
        raise DataError(f"data.{key} must be an integer >= {minimum}{null}, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- shared steps


def _subset_indices(n: int, cap: int | None, seed: int, stream: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of ``cap`` out of ``n``; None: keep all."""
    if cap is None or cap >= n:
        return None
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=cap, replace=False))


def _cap(x, y, cap, seed, stream):
    idx = _subset_indices(len(x), cap, seed, stream)
    return (x, y) if idx is None else (x[idx], y[idx])


def _split_validation(x, y, opts: _Options):
    n = len(x)
    n_val = round(opts.val_split * n)
    if n - n_val < 1:
        raise DataError(f"data.val_split={opts.val_split} leaves no training examples out of "
                        f"{n}: lower val_split or raise limit.")
    rng = np.random.default_rng([opts.seed, _STREAM_VAL])
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.choice(n, size=n_val, replace=False)] = True
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)  # both in original order
    return x[train], y[train], x[val], y[val]


def _normalize(mode, scale, x_train, *others):
    """Return float32 copies of ``x_train`` and ``others``, normalized as ``mode`` says."""
    arrays = (x_train, *others)
    if mode == "unit" and scale is not None:
        # One pass, and exactly float32(x) / float32(scale): 255 / 255 is exactly 1.
        return [np.divide(x, np.float32(scale), dtype=np.float32) for x in arrays]
    if mode == "standard":
        mean, std = _channel_stats(x_train)
        std[std == 0] = 1.0  # a constant channel is only centred
        return [_standardize(x, mean, std) for x in arrays]
    return [np.array(x, dtype=np.float32) for x in arrays]  # always copies


def _rows(x: np.ndarray) -> np.ndarray:
    """(N, features) view; explicit size because reshape(0, -1) fails on empty arrays."""
    return x.reshape(len(x), int(np.prod(x.shape[1:], dtype=np.int64)))


def _channel_stats(x: np.ndarray, rows: int = 2048):
    """Per-channel (last axis) mean and standard deviation, in float64.

    Sums per feature over chunks of examples, then per channel: numpy's ``std`` over
    axes (0, 1, 2) would copy the whole array to float64 (1.2 GB for CIFAR-10) and
    loop over a channel axis of length 3, many times slower.
    """
    flat = _rows(x)
    total = np.zeros(flat.shape[1])
    squares = np.zeros(flat.shape[1])
    for start in range(0, len(flat), rows):
        chunk = flat[start:start + rows].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += np.einsum("ij,ij->j", chunk, chunk)
    channels = x.shape[-1]
    count = len(flat) * (flat.shape[1] // channels)
    mean = total.reshape(-1, channels).sum(axis=0) / count
    variance = squares.reshape(-1, channels).sum(axis=0) / count - mean ** 2
    return mean, np.sqrt(np.maximum(variance, 0.0))


def _standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # Per-feature rows (the channel stats tiled over pixels) keep numpy's inner loop long.
    flat = _rows(x)
    repeats = flat.shape[1] // len(mean)
    out = flat.astype(np.float32)  # cast first: a casting subtract is several times slower
    out -= np.tile(mean, repeats).astype(np.float32)
    out /= np.tile(std, repeats).astype(np.float32)
    return out.reshape(x.shape)


def _keras_load(name: str):
    """``keras.datasets.<name>.load_data()``: Keras' cache, else a download.

    Kept separate (and importing Keras, hence TensorFlow, only here) so that tests can
    replace it and never touch the network.
    """
    import keras  # heavy; only for this fallback

    module = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist,
              "cifar10": keras.datasets.cifar10}[name]
    return module.load_data()


_KERAS_CACHE_NAMES = {"mnist": "mnist.npz", "fashion_mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py"}


def _offline() -> bool:
    return os.environ.get("NICS_FIX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _keras_cache(name: str) -> Path:
    home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(home) / "datasets" / _KERAS_CACHE_NAMES[name]


def _keras_fallback(name: str, searched: list[str], help_text: str):
    """Load through Keras, or raise the DataError that says where we looked."""
    where = "\n".join(f"  - {s}" for s in searched) or "  (no directory: data.path is null)"
    if _offline() and not _keras_cache(name).exists():
        raise DataError(f"Could not load {name}.\nSearched:\n{where}\n"
                        f"  - Keras' cache {_keras_cache(name)} (absent); downloads are off (NICS_FIX_OFFLINE=1)\n"
                        f"{help_text}")
    # A warning when local places were searched in vain: a typo in data.path should not
    # pass unnoticed behind a download.
    (log.warning if searched else log.info)(
        "%s: not found in %s; trying keras.datasets (cache, then download)",
        name, "; ".join(searched) or "any local directory")
    # urllib waits forever on a silent network: a socket timeout makes the download fail instead.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(float(os.environ.get("NICS_FIX_DOWNLOAD_TIMEOUT", "60")))
    try:
        (x_train, y_train), (x_test, y_test) = _keras_load(name)
    except Exception as e:  # URL errors, missing Keras, a bad cache file: all the same to the user
        raise DataError(
            f"Could not load {name}.\nSearched:\n{where}\n"
            f"  - keras.datasets.{name}.load_data() (cache ~/.keras/datasets, then a "
            f"download) failed: {type(e).__name__}: {e}\n{help_text}\n"
            "(NICS_FIX_OFFLINE=1 skips the download.)") from e
    finally:
        socket.setdefaulttimeout(previous)
    return (np.asarray(x_train), np.asarray(y_train).reshape(-1),
            np.asarray(x_test), np.asarray(y_test).reshape(-1))


# --------------------------------------------------------------------------- loaders


def _load_digits(opts: _Options) -> _Raw:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError("The digits data set comes with scikit-learn, which is not installed: "
                        "pip install scikit-learn (or the project's [platform] extra).") from e
    digits = load_digits()
    x = digits.images.astype(np.uint8)[..., None]  # values 0..16, stored as float64 by sklearn
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_TEST_SEED)
    x_train, y_train = _cap(x_train, y_train, opts.limit, opts.seed, _STREAM_TRAIN_LIMIT)
    x_test, y_test = _cap(x_test, y_test, opts.test_limit, opts.seed, _STREAM_TEST_LIMIT)
    return _Raw(x_train, y_train, x_test, y_test, scale=16.0,
                class_names=DIGITS_CLASSES, num_classes=10)


def _load_synthetic(opts: _Options) -> _Raw:
    dim = int(np.prod(opts.shape))
    # The projection depends on the task's shape only: every seed samples the same task.
    projection = np.random.default_rng([_SYNTHETIC_PROJECTION_SEED, dim, opts.num_classes]) \
        .standard_normal((dim, opts.num_classes))
    projection /= np.linalg.norm(projection, axis=0)  # equal norms keep the classes balanced
    rng = np.random.default_rng([opts.seed, _STREAM_SYNTHETIC])
    x = rng.standard_normal((opts.num_examples + opts.test_examples, dim))
    y = np.argmax(x @ projection, axis=1).astype(np.int64)
    # A margin: move each input one unit along its own class direction. The argmax (the
    # label) cannot change, and the classes separate enough for a tiny model to learn
    # them from a few hundred examples (least squares: ~95% instead of ~55%).
    x += _SYNTHETIC_MARGIN * projection.T[y]
    x = x.astype(np.float32).reshape((len(x), *opts.shape))
    n = opts.num_examples
    x_train, y_train = _cap(x[:n], y[:n], opts.limit, opts.seed, _STREAM_TRAIN_LIMIT)
    x_test, y_test = _cap(x[n:], y[n:], opts.test_limit, opts.seed, _STREAM_TEST_LIMIT)
    return _Raw(x_train, y_train, x_test, y_test, scale=None,
                class_names=None, num_classes=opts.num_classes)


def _idx_files_in(directory: Path):
    """({key: file}, []) when all four IDX files are in ``directory``, else ({}, reasons)."""
    if not directory.is_dir():
        return {}, ["not a directory" if directory.exists() else "does not exist"]
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{stem}[.gz]")
    return (found, []) if not missing else ({}, [f"missing {', '.join(missing)}"])


def _load_idx_dataset(opts: _Options) -> _Raw:
    name = opts.name
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    directories = []
    if opts.path is not None:
        directories.append(opts.path)
    elif default_data_dir() is not None:
        directories.append(default_data_dir() / name)
    if name == "fashion_mnist":
        directories.append(DEBIAN_FASHION_MNIST_DIR)

    searched = []
    for directory in directories:
        files, reasons = _idx_files_in(directory)
        if files:
            log.info("%s: reading IDX files from %s", name, directory)
            x_train, y_train, x_test, y_test = _read_idx_set(files, len(classes))
            break
        searched.append(f"{directory} ({'; '.join(reasons)})")
    else:
        expected = ", ".join(IDX_FILES.values())
        help_text = (f"Expected files (each plain or .gz): {expected}.\n"
                     f"Fix: put them in one directory and set data.path=/dir/with/idx/files, "
                     f"or set NICS_FIX_DATA to a directory holding {name}/.")
        if name == "fashion_mnist":
            help_text += (f"\nOn Debian/Ubuntu: apt-get install dataset-fashion-mnist "
                          f"(installs them in {DEBIAN_FASHION_MNIST_DIR}).")
        x_train, y_train, x_test, y_test = _keras_fallback(name, searched, help_text)

    x_train, y_train = _cap(x_train, y_train, opts.limit, opts.seed, _STREAM_TRAIN_LIMIT)
    x_test, y_test = _cap(x_test, y_test, opts.test_limit, opts.seed, _STREAM_TEST_LIMIT)
    return _Raw(x_train[..., None], y_train, x_test[..., None], y_test, scale=255.0,
                class_names=classes, num_classes=len(classes))


def _read_idx_set(files: dict, num_classes: int):
    arrays = {key: read_idx(path, ndim=3 if key.startswith("x") else 1)
              for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"{files[f'x_{split}']} holds {len(x)} images but "
                            f"{files[f'y_{split}']} holds {len(y)} labels: one of them is "
                            f"from another data set or damaged.")
        if len(y) and y.max() >= num_classes:
            raise DataError(f"{files[f'y_{split}']} has label {int(y.max())}, expected "
                            f"0..{num_classes - 1}: wrong or damaged file.")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"Train images are {arrays['x_train'].shape[1:]} but test images are "
                        f"{arrays['x_test'].shape[1:]} ({files['x_train']}, {files['x_test']}).")
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]


# --------------------------------------------------------------------------- CIFAR-10 (image folders: experiments/image_folders.py)


def _load_cifar10(opts: _Options) -> _Raw:
    from experiments import image_folders  # it imports this module's types

    sources = []
    if opts.path is not None:
        sources.append(opts.path)
    elif default_data_dir() is not None:
        sources.append(default_data_dir() / "cifar10" / "cifar10-images.tar.gz")

    searched = []
    for source in sources:
        found = image_folders._open_image_source(source)
        if isinstance(found, str):
            searched.append(f"{source} ({found})")
            continue
        return image_folders._load_image_folder(found, opts, image_shape=(32, 32, 3))

    help_text = ("Expected: an image folder <root>/{train,test}/<class name>/*.jpg|*.png "
                 "(32x32 RGB), its parent folder, or a .tar.gz archive of it.\n"
                 "Fix: set data.path=/path/to/cifar10-images.tar.gz (or the folder), or set "
                 "NICS_FIX_DATA to a directory holding cifar10/cifar10-images.tar.gz.")
    x_train, y_train, x_test, y_test = _keras_fallback("cifar10", searched, help_text)
    x_train, y_train = _cap(x_train, y_train, opts.limit, opts.seed, _STREAM_TRAIN_LIMIT)
    x_test, y_test = _cap(x_test, y_test, opts.test_limit, opts.seed, _STREAM_TEST_LIMIT)
    return _Raw(x_train, y_train, x_test, y_test, scale=255.0,
                class_names=CIFAR10_CLASSES, num_classes=10)



_LOADERS = {
    "digits": _load_digits,
    "mnist": _load_idx_dataset,
    "fashion_mnist": _load_idx_dataset,
    "cifar10": _load_cifar10,
    "synthetic": _load_synthetic,
}
