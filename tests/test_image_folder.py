"""A folder of the user's own JPEGs as a dataset (issue 29): both layouts, a validation folder of
its own, the decode-once cache, and one clear line for each kind of bad folder."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpns_core import image_folder
from vpns_core.config import ConfigError
from vpns_core.data import build_data, check_available
from vpns_core.train import Trial

from conftest import tiny

CLASSES = ("bag", "sandal", "trouser")


def fashion_images(n_per_class: int, offset: int = 0) -> dict[str, list[np.ndarray]]:
    """Real Fashion-MNIST test images (Debian's files) of three classes, as 28x28 uint8 arrays."""
    splits = build_data("fashion_mnist", None, 28, test_subset=None, train_subset=100, val_fraction=0.0)
    images, labels = splits.test.tensors()
    wanted = {8: "bag", 5: "sandal", 1: "trouser"}
    out = {name: [] for name in CLASSES}
    for k, name in wanted.items():
        picked = torch.nonzero(labels == k).flatten()[offset:offset + n_per_class]
        out[name] = [images[i, 0].numpy() for i in picked]
    return out


def write_folder(root: Path, per_class: dict[str, list[np.ndarray]]) -> None:
    for name, images in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).convert("RGB").save(root / name / f"{i:03d}.jpg", quality=95)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_folder(root / "train", fashion_images(24))
    write_folder(root / "test", fashion_images(8, offset=24))
    return root


def test_a_jpeg_folder_trains_end_to_end_and_its_counts_are_known(split_folder, tmp_path):
    cfg = tiny(dataset="image_folder", data_root=str(split_folder), train_subset=None, test_subset=None,
               val_fraction=0.25, label_mapping_samples=32, measure_repeats=0)
    trial = Trial(cfg, tmp_path)
    assert trial.data.classes == list(CLASSES) and trial.data.num_classes == 3
    assert (len(trial.data.train), len(trial.data.val), len(trial.data.test)) == (54, 18, 24)
    result = trial.run()
    assert result.final["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert 0.0 <= result.final["selected_test_acc"] <= 1.0


def test_images_are_decoded_once_into_a_memory_mapped_cache(split_folder, monkeypatch):
    first = build_data("image_folder", str(split_folder), 24, test_subset=None)
    images, labels = first.test.tensors()
    files = list(image_folder.cache_dir().glob("*-24.u8"))
    assert files  # written once ...
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded again"))
    again = build_data("image_folder", str(split_folder), 24, test_subset=None)  # ... read back
    assert torch.equal(again.test.tensors()[0], images) and torch.equal(again.test.tensors()[1], labels)
    # the cached pixels are those of decoding the JPEG and resizing it (torchvision, antialiased)
    monkeypatch.undo()
    from torchvision.transforms.v2 import functional as F
    path, label = image_folder.samples(split_folder / "test", CLASSES)[0]
    with Image.open(path) as img:
        expected = F.pil_to_tensor(F.resize(img.convert("RGB"), [24, 24], antialias=True))
    assert torch.equal(images[0], expected) and int(labels[0]) == label


def test_one_folder_is_split_by_a_seeded_stratified_draw(tmp_path):
    write_folder(tmp_path / "all", fashion_images(10))
    a = build_data("image_folder", str(tmp_path / "all"), 24, val_fraction=0.0)
    b = build_data("image_folder", str(tmp_path / "all"), 24, val_fraction=0.0)
    assert len(a.test) == 6 and len(a.train) == 24  # 2 of each class's 10 are test
    assert np.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert a.test.raw.source.samples == b.test.raw.source.samples  # the same for every trial
    train_files = {p for p, _ in a.train.raw.source.samples}
    assert not train_files & {p for p, _ in a.test.raw.source.samples}


def test_a_val_folder_is_the_validation_split(tmp_path):
    write_folder(tmp_path / "d" / "train", fashion_images(6))
    write_folder(tmp_path / "d" / "val", fashion_images(2, offset=6))
    write_folder(tmp_path / "d" / "test", fashion_images(2, offset=8))
    splits = build_data("image_folder", str(tmp_path / "d"), 24, val_fraction=0.5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)


@pytest.mark.parametrize("breakage, message", [
    ("empty", "class folder {root}/train/sandal is empty"),
    ("text", "{root}/train/bag/notes.txt is not an image"),
    ("truncated", "{root}/train/bag/000.jpg is not a readable image"),
    ("extra_class", "class 'coat' is in {root}/test but not in {root}/train"),
    ("no_classes", "{root}/train has no class folders"),
])
def test_a_bad_folder_is_refused_in_one_line_before_any_compute(breakage, message, tmp_path):
    root = tmp_path / "bad"
    write_folder(root / "train", fashion_images(2))
    write_folder(root / "test", fashion_images(1, offset=2))
    if breakage == "empty":
        for f in (root / "train" / "sandal").iterdir():
            f.unlink()
    elif breakage == "text":
        (root / "train" / "bag" / "notes.txt").write_text("not a picture")
    elif breakage == "truncated":
        data = (root / "train" / "bag" / "000.jpg").read_bytes()
        (root / "train" / "bag" / "000.jpg").write_bytes(data[:40])
    elif breakage == "extra_class":
        write_folder(root / "test", {"coat": fashion_images(1)["bag"]})
    elif breakage == "no_classes":
        for d in (root / "train").iterdir():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    with pytest.raises(ConfigError) as err:
        check_available("image_folder", str(root), False)
    assert message.format(root=root) in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("data_root: ")


def test_a_sweep_takes_a_folder_and_refuses_a_bad_one_before_ray(tmp_path, capsys):
    from sweeps import ablation_pad
    root = tmp_path / "bad"
    write_folder(root, fashion_images(2))
    (root / "bag" / "x.csv").write_text("1,2")
    rc = ablation_pad.main(["--preset", "tiny", "--storage-path", str(tmp_path / "s"), "--tracking-uri",
                            f"sqlite:///{tmp_path}/m.db", "--set", "dataset=image_folder",
                            "--data-root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{root}/bag/x.csv is not an image" in err and err.count("\n") == 1
