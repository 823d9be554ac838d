"""Image-folder datasets: ``<root>/{train,test}/<class>/*.jpg|*.png``, or a ``.tar.gz`` of it.

An archive is extracted once into :func:`experiments.data.cache_dir`; decoded
splits are cached there as ``.npz`` files keyed by the source's listing, so a
changed folder is decoded again. :func:`experiments.data.load_dataset` reads
CIFAR-10 through :func:`open_image_source` and :func:`load_image_folder`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.data import (
    _STREAM_TEST_LIMIT,
    _STREAM_TRAIN_LIMIT,
    IMAGE_SUFFIXES,
    DataError,
    _Options,
    _Raw,
    _subset_indices,
    cache_dir,
    log,
)
from nics_fix.saving import atomic_savez


@dataclass
class _ImageSource:
    """Images named ``<split>/<class>/<file>``, from a folder or an extracted archive."""

    where: str                      # the folder or archive, for messages
    cache_prefix: str               # start of the decoded-cache file names (source + key)
    entries: list[str]              # "train/cat/0001.jpg", ...
    open: Callable[[str], object]   # entry -> what PIL.Image.open takes


def _is_image_root(directory: Path) -> bool:
    return (directory / "train").is_dir() and (directory / "test").is_dir()


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _open_image_source(source: Path) -> _ImageSource | str:
    """The images under ``source``, or a string saying why there are none.

    Accepts an image-folder root, a folder with exactly one root (or one archive) in
    it, or an archive of a root (at its top or under one top folder).
    """
    if not source.exists():
        return "does not exist"
    if source.is_file():
        if not _is_archive(source):
            return "neither a folder nor a .tar.gz/.tgz/.tar archive"
        return _archive_source(source)
    if _is_image_root(source):
        return _folder_source(source)
    roots = [d for d in sorted(source.iterdir()) if d.is_dir() and _is_image_root(d)]
    archives = sorted(p for p in source.iterdir() if p.is_file() and _is_archive(p))
    if len(roots) + len(archives) > 1:
        raise DataError(f"{source} holds several image folders or archives "
                        f"({', '.join(p.name for p in roots + archives)}): set data.path to "
                        f"the one you mean.")
    if roots:
        return _folder_source(roots[0])
    if archives:
        return _archive_source(archives[0])
    return "no train/ and test/ folders in it or in one subfolder, and no .tar.gz archive"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _folder_source(root: Path) -> _ImageSource:
    entries = []
    for split in ("train", "test"):
        for class_dir in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            # os.scandir and strings: 60,000 Path objects take seconds to build and sort.
            with os.scandir(class_dir) as it:
                names = sorted(e.name for e in it
                               if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())
            entries += [f"{split}/{class_dir.name}/{name}" for name in names]
    # Folder mtimes change when files are added, removed or renamed in them.
    folders = [root / "train", root / "test"]
    folders += [d for split in folders for d in split.iterdir() if d.is_dir()]
    key = _digest(f"{root.resolve()}|" + "|".join(str(d.stat().st_mtime_ns) for d in folders))
    return _ImageSource(where=str(root), cache_prefix=f"{root.name}-{key}",
                        entries=entries, open=lambda entry: root / entry)


def _archive_stem(archive: Path) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if archive.name.endswith(suffix):
            return archive.name[: -len(suffix)]
    return archive.name


def _archive_source(archive: Path) -> _ImageSource:
    """The images of ``archive``, extracted once into the cache and reused.

    "Extracted" means packed into one file (``<stem>-<key>.images.npz``: the entry
    names and the concatenated file bytes): writing 60,000 small files takes from
    seconds to minutes depending on the file system, one 55 MB file a fraction of a
    second.
    """
    stat = archive.stat()
    key = _digest(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    prefix = f"{_archive_stem(archive)}-{key}"
    packed = cache_dir() / f"{prefix}.images.npz"
    if not packed.is_file():
        _extract_archive(archive, packed)
    entries = _read_packed(packed, archive, "names").tolist()
    index = {entry: i for i, entry in enumerate(entries)}
    contents = {}  # the bytes are read on first use: a load from the decoded cache needs none

    def open_entry(entry: str):
        if not contents:
            contents.update(offsets=_read_packed(packed, archive, "offsets"),
                            data=_read_packed(packed, archive, "data"))
        start, end = contents["offsets"][index[entry]:index[entry] + 2]
        return io.BytesIO(contents["data"][start:end].tobytes())

    return _ImageSource(where=str(archive), cache_prefix=prefix, entries=entries,
                        open=open_entry)


def _read_packed(packed: Path, archive: Path, key: str) -> np.ndarray:
    try:
        with np.load(packed) as npz:
            return npz[key]
    except Exception as e:
        raise DataError(f"The extracted copy {packed} of {archive} is unreadable ({e}): "
                        f"delete it to extract again.") from e


def _extract_archive(archive: Path, packed: Path) -> None:
    """Read the images of ``archive`` (one pass, any compression) into ``packed``."""
    log.info("extracting %s into %s (once; later loads reuse it)", archive, packed)
    start = time.perf_counter()
    names, blobs, tops = [], [], set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                # <split>/<class>/<file>, possibly under one top folder.
                if len(parts) == 4:
                    tops.add(parts[0])
                    parts = parts[1:]
                if len(parts) != 3 or parts[0] not in ("train", "test"):
                    continue
                names.append("/".join(parts))
                blobs.append(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"Cannot extract {archive}: {e}. The archive is damaged or not a "
                        f"tar archive: replace it.") from e
    if len(tops) > 1:
        raise DataError(f"Archive {archive} holds several top folders ({', '.join(sorted(tops))}); "
                        f"expected one image folder: <top>/{{train,test}}/<class>/<image>.")
    if not names:
        raise DataError(f"Archive {archive} has no images laid out as "
                        f"[<top>/]{{train,test}}/<class name>/<image>.jpg|.png.")
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    atomic_savez(packed, dict(names=np.array(names), offsets=offsets,
                              data=np.frombuffer(b"".join(blobs), dtype=np.uint8)))
    log.info("extracted %d images from %s in %.1f s", len(names), archive.name,
             time.perf_counter() - start)


def _image_splits(source: _ImageSource):
    """Class names (sorted train class folders) and, per split, entries and labels."""
    by_split = {"train": {}, "test": {}}
    for entry in source.entries:
        split, name, _ = entry.split("/")
        by_split[split].setdefault(name, []).append(entry)
    classes = sorted(by_split["train"])
    if not classes:
        raise DataError(f"{source.where}: no training images: expected "
                        f"train/<class name>/*.jpg|*.png in it.")
    extra = sorted(set(by_split["test"]) - set(classes))
    if extra:
        raise DataError(f"{source.where}: test/ has classes that train/ lacks: "
                        f"{', '.join(extra)}.")
    splits = {}
    for split, folders in by_split.items():
        if not folders:
            raise DataError(f"{source.where}: no {split} images: expected "
                            f"{split}/<class name>/*.jpg|*.png in it.")
        entries, labels = [], []
        for label, name in enumerate(classes):
            chosen = sorted(folders.get(name, []))
            entries += chosen
            labels += [label] * len(chosen)
        splits[split] = (entries, np.asarray(labels, dtype=np.int64))
    return classes, splits


def _load_image_folder(source: _ImageSource, opts: _Options, image_shape) -> _Raw:
    classes, splits = _image_splits(source)
    if opts.name == "cifar10" and len(classes) != 10:
        log.warning("%s: %d class folders, CIFAR-10 has 10", source.where, len(classes))
    arrays = {}
    for split, cap, stream in (("train", opts.limit, _STREAM_TRAIN_LIMIT),
                               ("test", opts.test_limit, _STREAM_TEST_LIMIT)):
        entries, labels = splits[split]
        idx = _subset_indices(len(entries), cap, opts.seed, stream)
        # Keyed by the source and the exact file list: a changed folder gets a new cache.
        cache_file = cache_dir() / f"{source.cache_prefix}-{_digest(chr(10).join(entries))}.{split}.npz"
        x = _read_decoded_cache(cache_file, len(entries), image_shape)
        if x is not None:
            x = x if idx is None else x[idx]
        elif idx is not None:  # a capped load decodes only the chosen images
            x = _decode_images(source, [entries[i] for i in idx], image_shape)
        else:
            x = _decode_images(source, entries, image_shape)
            try:
                atomic_savez(cache_file, {"x": x})
            except OSError as e:  # e.g. a read-only home: still a working (slower) load
                log.warning("could not cache decoded images in %s: %s", cache_file, e)
        arrays[split] = (x, labels if idx is None else labels[idx])
    return _Raw(*arrays["train"], *arrays["test"], scale=255.0,
                class_names=classes, num_classes=len(classes))


def _read_decoded_cache(path: Path, count: int, image_shape) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as npz:
            x = npz["x"]
    except Exception as e:  # noqa: BLE001 -- a damaged cache is only a lost shortcut
        log.warning("ignoring unreadable cache %s (%s); decoding again", path, e)
        return None
    if x.shape != (count, *image_shape) or x.dtype != np.uint8:
        log.warning("ignoring cache %s with unexpected shape %s", path, x.shape)
        return None
    log.info("using decoded images from %s", path)
    return x


def _decode_images(source: _ImageSource, entries: list[str], image_shape) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("Decoding image folders needs Pillow: pip install pillow.") from e
    out = np.empty((len(entries), *image_shape), dtype=np.uint8)
    start = time.perf_counter()
    for i, entry in enumerate(entries):
        out[i] = _decode_image(Image, source, entry, image_shape)
    log.info("decoded %d images in %.1f s", len(entries), time.perf_counter() - start)
    return out


def _decode_image(Image, source: _ImageSource, entry: str, image_shape) -> np.ndarray:
    where = source.open(entry)
    name = where if isinstance(where, Path) else f"{entry} in {source.where}"
    try:
        with Image.open(where) as image:
            # Grey or palette images become RGB; the size must already be right.
            array = np.asarray(image.convert("RGB"))
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise DataError(f"Cannot decode image {name}: {e}. Remove or replace the file.") from e
    if array.shape != tuple(image_shape):
        raise DataError(f"Image {name} is {array.shape[1]}x{array.shape[0]} pixels, "
                        f"expected {image_shape[1]}x{image_shape[0]} RGB: resize or remove it.")
    return array
