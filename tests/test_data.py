"""Specification of vpns_core.data: registry errors, the embedded datasets, splits and augmentation."""
from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from vpns_core import data
from vpns_core.data import (DATASETS, DataSplits, DataUnavailableError, build_data, check_available,
                            random_crop_flip, train_load_size)
from vpns_core.registry import UnknownNameError

FILE_DATASETS = [n for n in DATASETS.names() if not DATASETS.get(n).embedded]
EMBEDDED = [n for n in DATASETS.names() if DATASETS.get(n).embedded]
SYSTEM_FMNIST = data.FASHION_MNIST_SYSTEM_DIR
needs_fmnist = pytest.mark.skipif(not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install -y dataset-fashion-mnist")


@pytest.fixture
def no_network(monkeypatch):
    """Every URL fetch fails at once, as on a machine without network (and never downloads)."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, n_train: int, n_test: int, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    folder.mkdir(parents=True)
    for stem, arr in arrays.items():
        _write_idx(folder / (stem + (".gz" if gz else "")), arr)
    return arrays


# ---------------------------------------------------------------- registry and availability


def test_every_paper_dataset_is_registered():
    assert set(DATASETS.names()) == {"fashion_mnist", "digits", "cifar10", "cifar100", "tiny_imagenet",
                                     "food101", "flowers102", "dtd", "oxford_pets", "stanford_cars",
                                     "imagenet", "image_folder"}  # the last: the user's own
    assert {n: DATASETS.get(n).num_classes for n in ("cifar100", "tiny_imagenet", "food101",
                                                     "flowers102", "dtd", "oxford_pets",
                                                     "stanford_cars", "imagenet")} == {
        "cifar100": 100, "tiny_imagenet": 200, "food101": 101, "flowers102": 102, "dtd": 47,
        "oxford_pets": 37, "stanford_cars": 196, "imagenet": 1000}
    assert EMBEDDED == ["digits", "fashion_mnist"]


def test_unknown_dataset_names_field_and_choices():
    with pytest.raises(UnknownNameError) as err:
        check_available("cifar11", None, False)
    msg = str(err.value)
    assert msg.startswith("dataset:") and "'cifar11'" in msg
    assert all(name in msg for name in DATASETS.names())
    with pytest.raises(UnknownNameError):
        build_data("cifar11", None, 32)


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_missing_files_raise_one_clear_error(name, tmp_path):
    spec = DATASETS.get(name)
    with pytest.raises(DataUnavailableError) as err:
        check_available(name, str(tmp_path), False)
    msg = str(err.value)
    assert f"'{name}'" in msg and str(tmp_path) in msg and spec.files_hint in msg and "--data-root" in msg
    assert ("--download" in msg) == spec.downloadable
    with pytest.raises(DataUnavailableError, match="no --data-root given"):
        check_available(name, None, False)
    with pytest.raises(DataUnavailableError):  # before any loading
        build_data(name, str(tmp_path), 32)
    assert list(tmp_path.iterdir()) == []  # nothing was created or fetched


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_download_without_network_ends_in_data_unavailable(name, tmp_path, no_network):
    spec = DATASETS.get(name)
    if not spec.downloadable:
        with pytest.raises(DataUnavailableError, match="cannot"):
            check_available(name, str(tmp_path), True)
        return
    check_available(name, str(tmp_path), True)  # might work, so it must not fail early
    with pytest.raises(DataUnavailableError) as err:
        build_data(name, str(tmp_path), 32, download=True)
    assert "no network (test)" in str(err.value) and "--download" in str(err.value)
    assert isinstance(err.value.__cause__, Exception)


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_datasets_are_available_without_root(name):
    check_available(name, None, False)


def test_fashion_mnist_missing_everywhere_names_apt_and_flags(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataUnavailableError) as err:
        check_available("fashion_mnist", str(tmp_path), False)
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "--data-root" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "FashionMNIST/raw" in msg
    with pytest.raises(DataUnavailableError, match="no network"):
        build_data("fashion_mnist", str(tmp_path), 28, download=True)


def test_train_load_size_is_nine_eighths():
    assert [train_load_size(s) for s in (32, 64, 192, 224)] == [36, 72, 216, 252]


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("sub, gz", [("FashionMNIST/raw", False), ("fashion-mnist", True)])
def test_fashion_mnist_reads_idx_from_data_root_first(tmp_path, sub, gz):
    arrays = _fake_fashion_mnist(tmp_path / sub, 40, 20, gz)
    splits = build_data("fashion_mnist", str(tmp_path), 28, val_fraction=0.25)  # 28 px: no resize
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    for k in range(20):
        img, label = splits.test[k]
        assert img.dtype == torch.uint8 and img.shape == (3, 28, 28)
        expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][k]).to(torch.uint8)
        assert torch.equal(img, expected.expand(3, -1, -1))
        assert label == k % 10
    for k in range(len(splits.val)):
        img, label = splits.val[k]
        i = splits.val.indices[k]
        assert label == i % 10 and np.array_equal(img[0].numpy(), arrays["train-images-idx3-ubyte"][i])


@needs_fmnist
def test_fashion_mnist_full_debian_data():
    splits = build_data("fashion_mnist", None, 32, val_fraction=0.1)
    assert isinstance(splits, DataSplits) and splits.num_classes == 10
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert len(splits.train_eval) == 54000
    assert np.bincount(splits.val.labels).tolist() == [600] * 10
    assert np.bincount(splits.test.labels).tolist() == [1000] * 10
    img, label = splits.train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 36, 36) and 0 <= label <= 9
    img, label = splits.test[0]
    assert img.shape == (3, 32, 32) and label == 9  # the first test image is an ankle boot
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grey -> 3 equal channels
    with gzip.open(SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    expected = F.resize(torch.from_numpy(raw[:1].copy()), [32, 32], antialias=True)[0, 0]
    assert torch.equal(img[0], expected)
    x, y = splits.test.tensors()
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert 65 < x.float().mean() < 80  # Fashion-MNIST's mean pixel is 0.286 * 255 = 73
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert set(np.unique(splits.train.labels).tolist()) == set(range(10))


@needs_fmnist
def test_fashion_mnist_subsets_exact_disjoint_balanced_reproducible():
    kwargs = dict(train_subset=1000, test_subset=500, val_fraction=0.1)
    a = build_data("fashion_mnist", None, 32, data_seed=3, **kwargs)
    assert (len(a.train), len(a.train_eval), len(a.val), len(a.test)) == (1000, 1000, 100, 500)
    assert np.bincount(a.train.labels).tolist() == [100] * 10
    assert np.bincount(a.val.labels).tolist() == [10] * 10
    assert np.bincount(a.test.labels).tolist() == [50] * 10
    assert not set(a.train.indices) & set(a.val.indices)
    assert np.array_equal(a.train.indices, a.train_eval.indices)
    assert a.train[5][1] == a.train_eval[5][1] and a.train_eval[5][0].shape == (3, 32, 32)
    b = build_data("fashion_mnist", None, 32, data_seed=3, **kwargs)
    c = build_data("fashion_mnist", None, 32, data_seed=4, **kwargs)
    assert np.array_equal(a.train.indices, b.train.indices) and np.array_equal(a.val.indices, b.val.indices)
    assert np.array_equal(a.test.indices, b.test.indices) and torch.equal(a.train[7][0], b.train[7][0])
    assert len(set(a.train.indices) & set(c.train.indices)) < 100  # ~1000 * 1000 / 60000 expected
    odd = build_data("fashion_mnist", None, 32, train_subset=15, val_fraction=0.2)
    assert len(odd.train) == 15 and len(odd.val) == 3
    per_class = np.bincount(odd.train.labels, minlength=10)
    assert per_class.max() - per_class.min() <= 1


@needs_fmnist
def test_build_data_rejects_bad_arguments_by_field():
    with pytest.raises(ValueError, match="val_fraction"):
        build_data("fashion_mnist", None, 32, val_fraction=1.0)
    with pytest.raises(ValueError, match="train_subset"):
        build_data("fashion_mnist", None, 32, train_subset=59000, val_fraction=0.1)
    with pytest.raises(ValueError, match="test_subset"):
        build_data("fashion_mnist", None, 32, train_subset=10, test_subset=10001)
    with pytest.raises(ValueError, match="input_size"):
        build_data("fashion_mnist", None, 0)


# ---------------------------------------------------------------- digits and file datasets


def test_digits_fixed_test_split_and_scaled_values():
    a = build_data("digits", None, 32, val_fraction=0.1, data_seed=0)
    b = build_data("digits", None, 32, val_fraction=0.1, data_seed=5)
    assert a.classes == [str(k) for k in range(10)] and a.num_classes == 10
    assert len(a.train) + len(a.val) == 1198 and len(a.test) == 599 and len(a.val) == 120
    assert np.array_equal(a.test.labels, b.test.labels)  # test split does not follow data_seed
    assert not np.array_equal(a.val.indices, b.val.indices)
    x, y = a.test.tensors()
    assert x.shape == (599, 3, 32, 32) and x.dtype == torch.uint8 and int(x.max()) == 255
    class_sizes = np.bincount(np.concatenate([a.train.labels, a.val.labels, a.test.labels]))
    assert np.abs(np.bincount(y.numpy()) - class_sizes / 3).max() <= 1  # stratified thirds
    src = data._digits_split()[1][0]  # first raw test image, 8x8 in 0..255
    assert src.max() == 255
    assert torch.equal(x[0, 0], F.resize(torch.from_numpy(src[None].copy()), [32, 32], antialias=True)[0])
    assert a.train[0][0].shape == (3, 36, 36)


@pytest.mark.parametrize("official_val", [True, False])
def test_tiny_imagenet_layouts(tmp_path, official_val):
    base = tmp_path / "tiny-imagenet-200"
    colours = {"n01": (255, 0, 0), "n02": (0, 0, 255)}
    for wnid, colour in colours.items():
        (base / "train" / wnid / "images").mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (64, 64), colour).save(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG")
    lines = []
    for k, wnid in enumerate(["n02", "n01", "n02"]):
        folder = base / "val" / ("images" if official_val else wnid)
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), colours[wnid]).save(folder / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    if official_val:
        (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\n")
    check_available("tiny_imagenet", str(tmp_path), False)
    splits = build_data("tiny_imagenet", str(tmp_path), 16, val_fraction=0.25)
    assert splits.classes == ["goldfish", "shark"] and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 3)
    assert sorted(splits.test.labels.tolist()) == [0, 1, 1]
    for img, label in (splits.test[k] for k in range(3)):
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
        red, blue = img[0].float().mean(), img[2].float().mean()
        assert (red > 200 and blue < 50) if label == 0 else (blue > 200 and red < 50)
    assert splits.train[0][0].shape == (3, 18, 18)


# ---------------------------------------------------------------- resize_square


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("shape,size", [((5, 1, 28, 28), 27), ((5, 1, 28, 28), 32), ((3, 9, 13), 24),
                                        ((2, 3, 64, 64), 36)])
def test_resize_square_equals_torchvision_resize(native, shape, size, monkeypatch):
    """Both branches (torch's native uint8 kernel, and float32 rounded, as on a CPU without AVX2
    or on a GPU) give torchvision's values exactly, down and up, for any leading dimensions."""
    from torchvision.transforms.v2.functional import _geometry
    monkeypatch.setattr(data, "_NATIVE_UINT8_RESIZE", native)
    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: native)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data.resize_square(images, size)
    assert out.dtype == torch.uint8 and out.shape == (*shape[:-2], size, size)
    assert torch.equal(out, F.resize(images, [size, size], antialias=True))
    assert data.resize_square(out, size) is out  # already that size: untouched


# ---------------------------------------------------------------- random_crop_flip


def _offsets(out: torch.Tensor, x: torch.Tensor) -> list[tuple[int, int, bool]]:
    """For each sample, the (top, left, flipped) whose crop of x equals out (asserts one exists)."""
    size, found = out.shape[-1], []
    for b in range(len(x)):
        hits = [(t, l, f) for t in range(x.shape[2] - size + 1) for l in range(x.shape[3] - size + 1)
                for f in (False, True)
                if torch.equal(out[b], (lambda c: c.flip(-1) if f else c)(x[b, :, t:t + size, l:l + size]))]
        assert len(hits) == 1, f"sample {b} is not a crop of its input"
        found.append(hits[0])
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_random_crop_flip_takes_exact_independent_crops(dtype):
    b, c, s, size = 64, 3, 12, 8
    x = torch.arange(b * c * s * s).reshape(b, c, s, s)
    x = (x % 251).to(dtype) if dtype == torch.uint8 else x.to(dtype)  # uint8: crops still unique per row
    out = random_crop_flip(x, size, torch.Generator().manual_seed(0))
    assert out.shape == (b, c, size, size) and out.dtype == dtype and out.is_contiguous()
    found = _offsets(out, x)
    assert len({(t, l) for t, l, _ in found}) > 10
    assert 10 < sum(f for *_, f in found) < 54  # both flips, roughly half each
    assert {t for t, _, _ in found} == set(range(s - size + 1))


def test_random_crop_flip_reproducible_and_edge_cases():
    x = torch.randn(16, 3, 36, 36)
    a = random_crop_flip(x, 32, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_crop_flip(x, 32, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_crop_flip(x, 32, torch.Generator().manual_seed(2)))
    same = random_crop_flip(x, 36, torch.Generator().manual_seed(0))  # size == side: only flips
    assert all(torch.equal(same[k], x[k]) or torch.equal(same[k], x[k].flip(-1)) for k in range(16))
    assert random_crop_flip(x, 32).shape == (16, 3, 32, 32)  # default generator
    with pytest.raises(ValueError, match="size"):
        random_crop_flip(x, 40)


def test_random_crop_flip_never_reads_values_back_to_host(monkeypatch):
    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation")
    for method in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    out = random_crop_flip(torch.zeros(8, 3, 36, 36), 32, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (VPNS_TEST_CUDA=1)")
def test_random_crop_flip_cuda_without_sync():
    x = torch.randint(0, 255, (32, 3, 36, 36), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = random_crop_flip(x, 32, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.shape == (32, 3, 32, 32)


def test_vpns_data_root_is_the_default_data_root_of_every_dataset(tmp_path, monkeypatch):
    """One data root for every step of a run (the GPU check carries Fashion-MNIST in .gpu/data):
    with the Debian folder hidden, $VPNS_DATA_ROOT/fashion-mnist is read; an explicit data_root
    still wins."""
    import shutil

    import vpns_core.data as data
    copy = tmp_path / "carried" / "fashion-mnist"
    copy.mkdir(parents=True)
    for f in data.FASHION_MNIST_SYSTEM_DIR.glob("*-ubyte.gz"):
        shutil.copy(f, copy / f.name)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "hidden")
    with pytest.raises(DataUnavailableError, match="no --data-root given"):
        check_available("fashion_mnist", None, False)
    monkeypatch.setenv("VPNS_DATA_ROOT", str(tmp_path / "carried"))
    check_available("fashion_mnist", None, False)
    splits = build_data("fashion_mnist", None, 28, train_subset=20, test_subset=10)
    assert len(splits.train) == 20 and len(splits.test) == 10
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "elsewhere")):
        check_available("fashion_mnist", str(tmp_path / "elsewhere"), False)
