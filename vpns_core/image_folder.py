"""Your own images: a folder in torchvision's ``ImageFolder`` layout, and the decode-once cache
every dataset of image files uses.

Layouts of ``--data-root DIR`` with ``dataset="image_folder"``:

- ``DIR/train/<class>/*.jpg`` with an optional ``DIR/test/<class>/...`` (and ``DIR/val/``: then
  validation comes from there instead of being drawn beside the training images);
- ``DIR/<class>/*.jpg``: one folder, split by a seeded, class-stratified draw into training
  (``1 - TEST_FRACTION``) and test images.

:func:`check_folder` refuses a bad folder in one line before any compute: no class folders, an
empty class folder, a file that is not an image, an image that does not decode, a class in
``test/`` or ``val/`` that ``train/`` lacks.

:func:`decoded` decodes and resizes a split's images once per (files, size) into an uint8 file
under the cache folder (``VPNS_CACHE``, default ``~/.cache/vpns``) that later epochs, trials and
processes memory-map instead of decoding JPEGs again.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: files a folder of images commonly holds that are not data
IGNORED = (".DS_Store", "Thumbs.db", "desktop.ini")
TEST_FRACTION = 0.2
SPLITS = ("train", "val", "test")


class FolderError(ConfigError):
    """A folder of images that cannot serve as a dataset; the message names the file or folder."""


def layout(root: Path) -> dict[str, Path]:
    """The split folders of ``root``: ``{"train": ..., "val": ..., "test": ...}`` for the
    split layout (present ones only), ``{"all": root}`` for one folder of class folders."""
    if (root / "train").is_dir():
        return {s: root / s for s in SPLITS if (root / s).is_dir()}
    return {"all": root}


def _classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in IGNORED
                  and not p.name.startswith("."))


def samples(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) of every image under ``folder/<class>/`` in sorted order."""
    index = {c: k for k, c in enumerate(classes)}
    return [(p, index[c]) for c in _classes(folder) for p in _files(folder / c)]


def check_folder(root: Path, verify_images: bool = True) -> dict[str, int]:
    """Raise :class:`FolderError` naming the first problem; return the image count per split.
    ``verify_images`` opens every image's header (PIL ``verify``), which finds truncated and
    non-image files without decoding the pixels, once per set of files (a marker in the cache
    folder remembers files that passed, keyed by their paths, sizes and modification times)."""
    if not root.is_dir():
        raise FolderError(f"data_root: {root} is not a folder of images")
    splits = layout(root)
    train_key = "train" if "train" in splits else "all"
    classes = _classes(splits[train_key])
    if not classes:
        raise FolderError(f"data_root: {splits[train_key]} has no class folders (expected "
                          f"{splits[train_key]}/<class>/<image>.jpg, or train/ and test/ folders of those)")
    counts = {}
    everything = [p for folder in splits.values() for c in _classes(folder) for p in _files(folder / c)]
    marker = cache_dir() / f"{files_key(everything)}.verified"
    verify_images = verify_images and not marker.is_file()  # these very files passed before
    for split, folder in splits.items():
        here = _classes(folder)
        extra = sorted(set(here) - set(classes))
        if extra:
            raise FolderError(f"data_root: class '{extra[0]}' is in {folder} but not in "
                              f"{splits[train_key]}: a model cannot be trained for it")
        n = 0
        for name in here:
            files = _files(folder / name)
            if not files and split in ("train", "all"):
                raise FolderError(f"data_root: class folder {folder / name} is empty")
            for path in files:
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    raise FolderError(f"data_root: {path} is not an image (suffixes read: "
                                      f"{', '.join(IMAGE_SUFFIXES)}); move it out of the dataset")
                if verify_images:
                    try:
                        with Image.open(path) as img:
                            img.verify()
                    except (UnidentifiedImageError, OSError, SyntaxError) as err:
                        raise FolderError(f"data_root: {path} is not a readable image "
                                          f"({type(err).__name__}: {err})") from err
            n += len(files)
        counts[split] = n
    if verify_images:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return counts


def split_all(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One folder's (train, test) positions: a class-stratified draw of ``TEST_FRACTION`` of the
    images (at least one per class with two or more) as test, seeded, the same for every trial."""
    rng = np.random.default_rng([seed, 7])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, round(TEST_FRACTION * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------- the decode-once cache


def cache_dir() -> Path:
    return Path(os.environ.get("VPNS_CACHE", Path.home() / ".cache" / "vpns")) / "images"


def files_key(paths: Sequence[Path]) -> str:
    """A digest of the files (path, size, modification time): a changed file is a new key."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def decoded(key: str, count: int, size: int, decode: Callable[[int], Tensor]) -> Tensor:
    """The ``count`` images ``decode(i)`` (uint8 [3, size, size]) as one uint8 tensor
    [count, 3, size, size] backed by a memory-mapped file ``<cache>/<key>-<size>.u8``, written
    once (under a file lock, atomically) and read by every later caller."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}-{size}.u8"
    shape = (count, 3, size, size)
    if not path.is_file():
        with open(folder / f"{key}-{size}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be writing it: wait for it
            if not path.is_file():
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                for i in range(count):
                    out[i] = decode(i).numpy()
                out.flush()
                del out
                os.replace(tmp, path)
    array = np.load(path, mmap_mode="c")  # copy-on-write: the file is never written through it
    if array.shape != shape:
        raise ValueError(f"{path}: cached shape {array.shape} is not {shape}; delete the file")
    return torch.from_numpy(array)
