"""Datasets by name, the train/val/test splits a trial uses, and batched on-device augmentation.

Two embedded datasets need no download: ``fashion_mnist`` (read from IDX files, Debian's
``dataset-fashion-mnist`` by default) and ``digits`` (scikit-learn). The paper's datasets come
from torchvision under ``--data-root``. Every split yields ``(uint8 tensor [3, S, S], int)``;
training images are only resized to ``train_load_size(input_size)`` here, and the random crop and
flip happen batched on the device (:func:`random_crop_flip`), so no worker process is needed.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from . import image_folder
from vpns_core.registry import Registry

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_CACHE_BYTES = 512 * 2**20  # tensor-backed splits up to this size are resized once, up front
#: torch has a native uint8 kernel for antialiased bilinear resizing on these CPUs (torchvision's
#: ``resize`` uses it there, and float32 elsewhere)
_NATIVE_UINT8_RESIZE = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                        or platform.machine() in ("aarch64", "arm64"))


def _torchvision_datasets() -> Any:
    """``torchvision.datasets``, imported on first use: the embedded datasets do not need it, and
    importing torchvision (its models, ops and datasets) costs a trial process about half a
    second of CPU on 2 cores."""
    import torchvision.datasets
    return torchvision.datasets


def resize_square(images: Tensor, size: int) -> Tensor:
    """uint8 images [..., C, H, W] -> [..., C, size, size], bilinear with antialiasing: the values of
    torchvision's ``resize(images, [size, size], antialias=True)`` (tested equal), computed by the
    same torch kernel, on uint8 where torch has a native uint8 kernel (the CPU, see
    ``_NATIVE_UINT8_RESIZE``), else in float32 and rounded. Without torchvision, whose import
    costs a trial process more than the resize."""
    if images.shape[-2:] == (size, size):
        return images
    native = images.device.type == "cpu" and _NATIVE_UINT8_RESIZE
    batch = images.reshape(-1, *images.shape[-3:])
    out = torch.nn.functional.interpolate(batch if native else batch.float(), size=[size, size],
                                          mode="bilinear", align_corners=False, antialias=True)
    out = out if native else out.round_().to(images.dtype)
    return out.reshape(*images.shape[:-2], size, size)


class DataUnavailableError(FileNotFoundError):
    """A dataset's files are missing (and could not be downloaded); the message says how to fix it."""


@dataclass(frozen=True)
class RawSplit:
    """One split as stored: ``source`` yields (PIL image or uint8 tensor [C, H, W], int label);
    ``labels`` (int64 [N]) and ``classes`` are known without decoding any image."""

    source: Dataset
    labels: np.ndarray
    classes: list[str]
    #: identifies the files behind ``source`` (:func:`vpns_core.image_folder.files_key`) when it
    #: decodes image files: their resized images are then decoded once into a disk cache
    cache_key: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What the library knows about a dataset before touching its files.

    ``load(root, train, download) -> RawSplit`` reads one split; ``present(root) -> bool`` checks
    (without decoding or network) that the files are there; ``downloadable`` says whether
    ``download=True`` can fetch them; ``fix_hint`` is an extra way to get the files (e.g. apt).
    """

    name: str
    num_classes: int
    embedded: bool
    files_hint: str
    load: Callable[[Path | None, bool, bool], RawSplit]
    present: Callable[[Path | None], bool]
    downloadable: bool = False
    fix_hint: str = ""
    #: a validation split of its own (``load_val(root) -> RawSplit | None``), used instead of
    #: drawing validation images beside the training images
    load_val: Callable[[Path | None], RawSplit | None] | None = None
    #: a check of the files' contents before any compute (``check(root)``), e.g. a folder of images
    check: Callable[[Path | None], None] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _unavailable(spec: DatasetSpec, root: Path | None, download: bool,
                 cause: BaseException | None = None) -> DataUnavailableError:
    where = f"not found under data root {root}" if root is not None else "no --data-root given"
    fixes = ["pass --data-root DIR where DIR holds those files"]
    if spec.downloadable:
        fixes.append("add --download (needs network) together with --data-root DIR")
    else:
        fixes.append("download them by hand (torchvision cannot fetch this dataset)")
    if spec.fix_hint:
        fixes.insert(0, spec.fix_hint)
    msg = f"dataset '{spec.name}' is unavailable: {where}. Expected {spec.files_hint}. Fix: " + "; or ".join(fixes)
    if cause is not None:
        msg += f". Download/load failed with {type(cause).__name__}: {cause}"
    elif download and not spec.downloadable:
        msg += " (--download was given, but this dataset cannot be downloaded)"
    return DataUnavailableError(msg)


def _root(data_root: str | Path | None) -> Path | None:
    """The data root: ``data_root``, else ``$VPNS_DATA_ROOT`` (one folder every step of a run
    reads, e.g. the GPU check's carried copy of Fashion-MNIST), else none (the embedded
    datasets' own places)."""
    chosen = data_root or os.environ.get("VPNS_DATA_ROOT")
    return Path(chosen).expanduser() if chosen else None


def check_available(name: str, data_root: str | None, download: bool) -> None:
    """Fail fast, before any compute: ``UnknownNameError`` (field 'dataset') for an unknown name,
    ``DataUnavailableError`` when the files are missing and cannot be downloaded. No decoding, no network."""
    spec = DATASETS.get(name, "dataset")
    root = _root(data_root)
    if spec.present(root):
        if spec.check is not None:
            spec.check(root)
        return
    if download and spec.downloadable and root is not None:
        return
    raise _unavailable(spec, root, download)


def _load_split(spec: DatasetSpec, root: Path | None, train: bool, download: bool) -> RawSplit:
    try:
        return spec.load(root, train, download)
    except Exception as err:  # no network: URLError, RuntimeError, ... from torchvision
        if spec.present(root):
            raise  # files are there, so this is a real bug or a corrupt file: show it as is
        raise _unavailable(spec, root, download, cause=err) from err


# ---------------------------------------------------------------- images held in memory


class TensorImages(Dataset):
    """Items (uint8 tensor [C, H, W], int) from one uint8 tensor [N, C, H, W] and labels [N]."""

    def __init__(self, images: Tensor, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of the shape its header gives."""
    return _read_idx_cached(str(path)).copy()


@lru_cache(maxsize=8)
def _read_idx_cached(path: str) -> np.ndarray:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    arr.flags.writeable = False
    return arr


_FMNIST_STEMS = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fashion_mnist_files(root: Path | None) -> dict[str, Path] | None:
    """stem -> file for the first folder holding all four IDX files (.gz or not), else None."""
    folders = [root / "fashion-mnist", root / "FashionMNIST" / "raw"] if root is not None else []
    for folder in [*folders, FASHION_MNIST_SYSTEM_DIR]:
        found = {}
        for stem in (*_FMNIST_STEMS[True], *_FMNIST_STEMS[False]):
            hit = next((folder / n for n in (stem + ".gz", stem) if (folder / n).is_file()), None)
            if hit is not None:
                found[stem] = hit
        if len(found) == 4:
            return found
    return None


def _load_fashion_mnist(root: Path | None, train: bool, download: bool) -> RawSplit:
    files = _fashion_mnist_files(root)
    if files is None and download and root is not None:
        # writes ROOT/FashionMNIST/raw
        _torchvision_datasets().FashionMNIST(str(root), train=train, download=True)
        files = _fashion_mnist_files(root)
    if files is None:
        raise FileNotFoundError("Fashion-MNIST IDX files not found")
    img_stem, lbl_stem = _FMNIST_STEMS[train]
    images = torch.from_numpy(_read_idx(files[img_stem])).unsqueeze(1)  # [N, 1, 28, 28]
    labels = _read_idx(files[lbl_stem]).astype(np.int64)
    return RawSplit(TensorImages(images, labels), labels, list(FASHION_MNIST_CLASSES))


@lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    # Fixed split, independent of data_seed, so every trial sees the same test set.
    return tuple(train_test_split(images, d.target.astype(np.int64), test_size=1 / 3,
                                  stratify=d.target, random_state=0))


def _load_digits(root: Path | None, train: bool, download: bool) -> RawSplit:
    x_train, x_test, y_train, y_test = _digits_split()
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return RawSplit(TensorImages(torch.from_numpy(x.copy()).unsqueeze(1), y), y,
                    [str(k) for k in range(10)])


DATASETS.add("fashion_mnist", DatasetSpec(
    "fashion_mnist", 10, True,
    "the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in DATA_ROOT/fashion-mnist/ or "
    f"DATA_ROOT/FashionMNIST/raw/ or {FASHION_MNIST_SYSTEM_DIR}/",
    _load_fashion_mnist, lambda root: _fashion_mnist_files(root) is not None,
    downloadable=True, fix_hint="apt-get install -y dataset-fashion-mnist"))
DATASETS.add("digits", DatasetSpec(
    "digits", 10, True, "nothing (bundled with scikit-learn)", _load_digits, lambda root: True))


# ---------------------------------------------------------------- datasets from files


class ImageFiles(Dataset):
    """Items (PIL RGB image, int) from a list of (path, label)."""

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            return img.convert("RGB"), label


def _raw(parts: list[Dataset]) -> RawSplit:
    """Concatenate torchvision datasets, reading labels and class names from their metadata."""
    labels = []
    for p in parts:
        if hasattr(p, "targets"):
            labels.append(np.asarray(p.targets))
        elif hasattr(p, "_labels"):
            labels.append(np.asarray(p._labels))
        else:  # StanfordCars
            labels.append(np.asarray([s[1] for s in p._samples]))
    names = getattr(parts[0], "classes", None)
    all_labels = np.concatenate(labels).astype(np.int64)
    source = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    data = getattr(parts[0], "data", None)
    if len(parts) == 1 and isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:
        # CIFAR: the whole split is one uint8 array [N, H, W, 3]; keep it as a tensor (resized in
        # batches, cached, or held on the device) instead of one PIL image per item
        source = TensorImages(torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), all_labels)
    if names is None:  # Flowers102 has no class names
        names = [f"class_{k}" for k in range(int(all_labels.max()) + 1)]
    classes = [c[0] if isinstance(c, tuple) else str(c) for c in names]  # ImageNet: name tuples
    paths = [p for part in parts for p in _image_paths(part)]
    key = image_folder.files_key(paths) if len(paths) == len(all_labels) else None
    return RawSplit(source, all_labels, classes, cache_key=None if isinstance(source, TensorImages) else key)


def _image_paths(part: Dataset) -> list[Path]:
    """The image files of a torchvision file dataset, in item order (empty if it has none)."""
    for attr in ("_image_files", "imgs", "samples", "_samples"):
        items = getattr(part, attr, None)
        if items:
            return [Path(x[0] if isinstance(x, (tuple, list)) else x) for x in items]
    return []


_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def _load_tiny_imagenet(root: Path | None, train: bool, download: bool) -> RawSplit:
    """Train: train/<wnid>/images/*.JPEG. Val (used as test): the official val/images +
    val_annotations.txt, or an ImageFolder layout val/<wnid>/*.JPEG."""
    base = root / "tiny-imagenet-200"
    wnids = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    index = {w: k for k, w in enumerate(wnids)}
    annotations = base / "val" / "val_annotations.txt"
    if train:
        samples = [(p, index[w]) for w in wnids for p in _images_in(base / "train" / w)]
    elif annotations.is_file():
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        samples = [(base / "val" / "images" / r[0], index[r[1]]) for r in rows]
    else:
        samples = [(p, index[w]) for w in wnids for p in _images_in(base / "val" / w)]
    words = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    labels = np.asarray([s[1] for s in samples], dtype=np.int64)
    return RawSplit(ImageFiles(samples), labels, [words.get(w, w) for w in wnids],
                    cache_key=image_folder.files_key([p for p, _ in samples]))


def _all_present(required: tuple[str, ...]) -> Callable[[Path | None], bool]:
    """A present() check: every entry must exist under the root; 'a|b' means either a or b."""
    def present(root: Path | None) -> bool:
        return root is not None and all(
            any((root / alt).exists() for alt in entry.split("|")) for entry in required)
    return present


def _add_files_dataset(name: str, num_classes: int, required: tuple[str, ...],
                       make: Callable[[Any, str, bool, bool], list[Dataset]] | None = None,
                       downloadable: bool = True,
                       load: Callable[[Path | None, bool, bool], RawSplit] | None = None) -> None:
    hint = "DATA_ROOT/" + ", DATA_ROOT/".join(r.replace("|", " (or ") + (")" if "|" in r else "")
                                           for r in required)
    if load is None:
        def load(root: Path | None, train: bool, download: bool) -> RawSplit:
            if root is None:
                raise FileNotFoundError("no data root")
            return _raw(make(_torchvision_datasets(), str(root), train, download))
    DATASETS.add(name, DatasetSpec(name, num_classes, False, hint, load, _all_present(required),
                                   downloadable=downloadable))


_add_files_dataset("cifar10", 10, ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"),
                   lambda tvd, r, t, d: [tvd.CIFAR10(r, train=t, download=d)])
_add_files_dataset("cifar100", 100, ("cifar-100-python/train", "cifar-100-python/test"),
                   lambda tvd, r, t, d: [tvd.CIFAR100(r, train=t, download=d)])
_add_files_dataset("tiny_imagenet", 200, ("tiny-imagenet-200/train", "tiny-imagenet-200/val"),
                   downloadable=False, load=_load_tiny_imagenet)
_add_files_dataset("food101", 101, ("food-101/meta", "food-101/images"),
                   lambda tvd, r, t, d: [tvd.Food101(r, split="train" if t else "test", download=d)])
_add_files_dataset("flowers102", 102, ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
                   lambda tvd, r, t, d: [tvd.Flowers102(r, split=s, download=d)
                                    for s in (("train", "val") if t else ("test",))])
_add_files_dataset("dtd", 47, ("dtd/dtd/images", "dtd/dtd/labels"),
                   lambda tvd, r, t, d: [tvd.DTD(r, split=s, partition=1, download=d)
                                    for s in (("train", "val") if t else ("test",))])
_add_files_dataset("oxford_pets", 37, ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations"),
                   lambda tvd, r, t, d: [tvd.OxfordIIITPet(r, split="trainval" if t else "test",
                                                      target_types="category", download=d)])
_add_files_dataset("stanford_cars", 196, ("stanford_cars/devkit", "stanford_cars/cars_train",
                                          "stanford_cars/cars_test", "stanford_cars/cars_test_annos_withlabels.mat"),
                   lambda tvd, r, t, d: [tvd.StanfordCars(r, split="train" if t else "test")],
                   downloadable=False)
_add_files_dataset("imagenet", 1000, ("ILSVRC2012_devkit_t12.tar.gz|meta.bin",
                                      "ILSVRC2012_img_train.tar|train", "ILSVRC2012_img_val.tar|val"),
                   lambda tvd, r, t, d: [tvd.ImageNet(r, split="train" if t else "val")],
                   downloadable=False)


def _folder_raw(folder: Path, classes: list[str], positions: np.ndarray | None = None) -> RawSplit:
    found = image_folder.samples(folder, classes)
    if positions is not None:
        found = [found[i] for i in positions]
    labels = np.asarray([c for _, c in found], dtype=np.int64)
    return RawSplit(ImageFiles(found), labels, list(classes),
                    cache_key=image_folder.files_key([p for p, _ in found]) if found else None)


def _load_image_folder(root: Path | None, train: bool, download: bool) -> RawSplit:
    """``DATA_ROOT/train`` (and ``test``), or one folder split by :func:`image_folder.split_all`
    (also ``train/`` without a ``test/`` beside it)."""
    if root is None:
        raise FileNotFoundError("no data root")
    splits = image_folder.layout(root)
    source = splits.get("train", splits.get("all"))
    classes = image_folder._classes(source)
    if "test" in splits:
        return _folder_raw(splits["train" if train else "test"], classes)
    labels = np.asarray([c for _, c in image_folder.samples(source, classes)], dtype=np.int64)
    train_pos, test_pos = image_folder.split_all(labels)
    return _folder_raw(source, classes, train_pos if train else test_pos)


def _load_image_folder_val(root: Path | None) -> RawSplit | None:
    splits = image_folder.layout(root) if root is not None else {}
    if "val" not in splits:
        return None
    return _folder_raw(splits["val"], image_folder._classes(splits["train"]))


DATASETS.add("image_folder", DatasetSpec(
    "image_folder", 0, False,
    "a folder of class folders: DATA_ROOT/train/<class>/*.jpg (optional DATA_ROOT/val/, "
    "DATA_ROOT/test/), or DATA_ROOT/<class>/*.jpg split 80/20 by a seeded stratified draw",
    _load_image_folder,
    # any non-empty folder is "there"; what it holds is for check_folder to judge
    lambda root: root is not None and root.is_dir() and any(root.iterdir()),
    load_val=_load_image_folder_val,
    check=lambda root: image_folder.check_folder(root)))


# ---------------------------------------------------------------- splits


def train_load_size(input_size: int) -> int:
    """Side of the stored training images: 9/8 of ``input_size``, randomly cropped back on device."""
    return round(9 / 8 * input_size)


class ResizedImages(Dataset):
    """Items (uint8 tensor [3, size, size], int) for ``raw`` at ``indices``: RGB, square, antialiased.

    In-memory (tensor) sources up to 512 MiB are resized once here; file sources per item.
    ``labels`` (int64 [len]) is available without decoding.
    """

    def __init__(self, raw: RawSplit, indices: np.ndarray, size: int) -> None:
        self.raw, self.indices, self.size = raw, np.asarray(indices, dtype=np.int64), size
        self.labels = raw.labels[self.indices]
        self._cache: Tensor | None = None
        src = raw.source
        if isinstance(src, TensorImages) and len(self.indices) * src.images.shape[1] * size**2 <= _CACHE_BYTES:
            picked = src.images[torch.from_numpy(self.indices)]
            self._cache = torch.cat([self._resize(c) for c in picked.split(4096)]) if len(picked) else \
                picked.new_zeros(0, picked.shape[1], size, size)
        elif raw.cache_key is not None and len(self.indices):
            # image files: decoded and resized once into a memory-mapped disk cache, not per item
            # and epoch (benchmarks/input_pipeline.py --folder measures both)
            key = hashlib.sha256(raw.cache_key.encode() + self.indices.tobytes()).hexdigest()[:24]
            self._cache = image_folder.decoded(
                key, len(self.indices), size,
                lambda i: self._resize(src[int(self.indices[i])][0]).expand(3, -1, -1))

    def _resize(self, img: Tensor | Image.Image) -> Tensor:
        if isinstance(img, Image.Image):  # a file dataset's, read through torchvision
            from torchvision.transforms.v2 import functional as F
            return F.pil_to_tensor(F.resize(img.convert("RGB"), [self.size, self.size], antialias=True))
        return resize_square(img, self.size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._cache is not None:
            img = self._cache[i]
        else:
            img = self._resize(self.raw.source[int(self.indices[i])][0])
        return img.expand(3, -1, -1).clone(memory_format=torch.contiguous_format), int(self.labels[i])

    def native(self) -> Tensor | None:
        """The split's images at their stored size, uint8 [N, C, H, W] (C = 1 or 3), when the
        source is held in memory as one tensor; else None (files: decoded per item)."""
        src = self.raw.source
        if not isinstance(src, TensorImages):
            return None
        return src.images[torch.from_numpy(self.indices)]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as (uint8 [N, 3, size, size], int64 [N]), e.g. to keep it on the device."""
        if self._cache is not None:
            images = self._cache.expand(-1, 3, -1, -1).contiguous()
        else:
            images = torch.stack([self[i][0] for i in range(len(self))]) if len(self) else \
                torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        return images, torch.from_numpy(self.labels.copy())


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder; ties by class)."""
    exact = total * counts / max(int(counts.sum()), 1)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[: total - int(quota.sum())]] += 1
    return quota


def _stratified(labels: np.ndarray, n_first: int, n_second: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, class-stratified, sorted index sets of sizes ``n_first`` and ``n_second``."""
    classes, counts = np.unique(labels, return_counts=True)
    q1 = _quotas(counts, n_first)
    q2 = _quotas(counts - q1, n_second)
    first, second = [], []
    for c, a, b in zip(classes, q1, q2):
        perm = rng.permutation(np.flatnonzero(labels == c))
        first.append(perm[:a])
        second.append(perm[a:a + b])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted positions drawn from ``rng`` across the whole of ``labels``, each class in
    proportion to its count: the same ``n`` images however the split is ordered (a dataset
    stored class by class included). ``n >= len(labels)`` gives every position."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    return _stratified(labels, n, 0, rng)[0]


@dataclass
class DataSplits:
    """``train``: uint8 [3, S, S] with S = train_load_size(input_size), to be cropped/flipped on
    device; ``train_eval`` (same images), ``val`` (held out from the training split) and ``test``:
    uint8 [3, input_size, input_size]. All items are (image, int label)."""

    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: list[str]


def split_record(name: str, data: DataSplits) -> dict[str, Any]:
    """What a trial trains and is tested on: the dataset's ``name``, the size of each split
    (``train``, ``val``, ``test``), ``num_classes``, and a ``digest`` (16 hex digits) of the
    images each split holds (their positions in the dataset's files and their labels), so two
    trials with the same digest saw the same images whatever their seeds."""
    splits: dict[str, ResizedImages] = {"train": data.train, "val": data.val, "test": data.test}
    sha = hashlib.sha256(name.encode())
    for split, images in splits.items():
        sha.update(split.encode())
        for array in (images.indices, images.labels):
            sha.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return {"name": name, **{k: len(v) for k, v in splits.items()},
            "num_classes": data.num_classes, "digest": sha.hexdigest()[:16]}


def build_data(name: str, data_root: str | None, input_size: int, *, train_subset: int | None = None,
               test_subset: int | None = None, val_fraction: float = 0.1, data_seed: int = 0,
               download: bool = False) -> DataSplits:
    """Load dataset ``name`` and split it.

    Without ``train_subset``, ``round(val_fraction * N)`` training images become ``val`` and the
    rest ``train``; with it, ``train`` has exactly ``train_subset`` images and ``val``
    ``round(val_fraction * train_subset)`` others. ``test_subset`` keeps that many test images.
    All subsets are class-stratified and drawn from ``data_seed`` alone (not the trial seed), so
    every trial of a sweep shares them. ``num_classes`` is the number of classes in the files.
    """
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size: must be a positive int, got {input_size!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction!r}")
    check_available(name, data_root, download)
    spec, root = DATASETS.get(name, "dataset"), _root(data_root)
    train_raw = _load_split(spec, root, True, download)
    test_raw = _load_split(spec, root, False, download)

    own_val = spec.load_val(root) if spec.load_val is not None else None
    n = len(train_raw.labels)
    if own_val is not None:  # a validation split of its own: none drawn from the training images
        n_train, n_val = (n if train_subset is None else train_subset), 0
        if n_train > n:
            raise ValueError(f"train_subset: {train_subset} training images requested, but {name} "
                             f"has {n}")
    elif train_subset is None:
        n_val = round(val_fraction * n)
        n_train = n - n_val
    else:
        n_train, n_val = train_subset, round(val_fraction * train_subset)
        if train_subset < 1 or n_train + n_val > n:
            raise ValueError(f"train_subset: {train_subset} training + {n_val} validation images "
                             f"requested, but {name} has {n} training images")
    train_idx, val_idx = _stratified(train_raw.labels, n_train, n_val, np.random.default_rng(data_seed))

    n_test = len(test_raw.labels)
    if test_subset is None:
        test_idx = np.arange(n_test)
    elif 1 <= test_subset <= n_test:
        test_idx = _stratified(test_raw.labels, test_subset, 0, np.random.default_rng([data_seed, 1]))[0]
    else:
        raise ValueError(f"test_subset: must be in 1..{n_test} for {name}, got {test_subset}")

    return DataSplits(
        train=ResizedImages(train_raw, train_idx, train_load_size(input_size)),
        train_eval=ResizedImages(train_raw, train_idx, input_size),
        val=ResizedImages(own_val, np.arange(len(own_val.labels)), input_size) if own_val is not None
        else ResizedImages(train_raw, val_idx, input_size),
        test=ResizedImages(test_raw, test_idx, input_size),
        num_classes=len(train_raw.classes),
        classes=list(train_raw.classes),
    )


def hold_on_device(split: ResizedImages, device: torch.device) -> tuple[Tensor, Tensor]:
    """A split's images at their stored size and its labels, copied to ``device`` once, for
    :class:`DeviceBatches`."""
    return split.native().to(device), torch.from_numpy(split.labels.copy()).to(device)


class DeviceBatches:
    """What a ``DataLoader`` over a :class:`ResizedImages` split yields (uint8 images
    [B, 3, size, size], int64 labels), from the split's copy on the device
    (:func:`hold_on_device`): each batch is gathered and resized there in one call, instead of
    image by image in CPU workers (CIFAR at 32 px -> 252 px ran at about 3k images/s with 4
    workers, below what one GPU trains ResNet-18 at). Shuffling draws the same
    ``torch.randperm`` from the same generator as the loader's ``RandomSampler``, so the order,
    the resume and the images equal the loader's."""

    def __init__(self, held: tuple[Tensor, Tensor], size: int, batch_size: int, *,
                 shuffle: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None, batch_sampler=None) -> None:
        self.images, self.labels = held
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator
        #: positions per batch instead of the loader's own order (a data-parallel rank's shard,
        #: :class:`vpns_core.distributed.ShardedBatches`, which draws from ``generator`` itself)
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        # The loader's draws, in its order, so that the random streams stay the same: its
        # workers' base seed, then RandomSampler's permutation (its own generator seeded from the
        # global one when the loader has none).
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if self.batch_sampler is not None:
            for positions in self.batch_sampler:
                yield self._batch(torch.tensor(positions, device=self.images.device))
            return
        if self.shuffle:
            generator = self.generator
            if generator is None:
                generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._batch(order[start:start + self.batch_size])

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images.index_select(0, idx)
        x = resize_square(x, self.size)
        return x.expand(-1, 3, -1, -1), self.labels.index_select(0, idx)


def device_copy_bytes(split: Dataset) -> int | None:
    """Bytes of a split's stored-size copy (None: not a :class:`ResizedImages` over one
    in-memory tensor)."""
    if not isinstance(split, ResizedImages) or not isinstance(split.raw.source, TensorImages):
        return None
    return len(split.indices) * int(np.prod(split.raw.source.images.shape[1:]))


# ---------------------------------------------------------------- augmentation


def random_crop_flip(x: Tensor, size: int, generator: torch.Generator | None = None,
                     draws: int | None = None, offset: int = 0) -> Tensor:
    """Random ``size`` x ``size`` crop plus horizontal flip (p = 0.5), independently per sample.

    ``x``: [B, C, H, W] of any dtype on any device; ``generator`` lives on ``x.device``. Returns
    [B, C, size, size]. Offsets are gathered with index tensors on the device: no host
    synchronisation, so it queues asynchronously on a GPU. ``draws``/``offset``: ``x`` is rows
    ``offset`` to ``offset + B`` of a batch of ``draws`` samples (a data-parallel rank's chunk of
    the global batch); the crops and flips are drawn for the whole batch, so the ranks together
    crop exactly as one process would.
    """
    b, c, h, w = x.shape
    if size > h or size > w:
        raise ValueError(f"size: crop {size} is larger than the images ({h}x{w})")
    dev = x.device
    n = b if draws is None else draws
    top = torch.randint(0, h - size + 1, (n, 1), generator=generator, device=dev)
    left = torch.randint(0, w - size + 1, (n, 1), generator=generator, device=dev)
    flip = torch.rand(n, 1, generator=generator, device=dev) < 0.5
    if draws is not None:
        top, left, flip = (t[offset:offset + b] for t in (top, left, flip))
    ar = torch.arange(size, device=dev)
    rows = top + ar  # [B, size]
    cols = left + torch.where(flip, size - 1 - ar, ar)  # flipped samples read columns backwards
    x = x.gather(2, rows[:, None, :, None].expand(b, c, size, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, size, size))
