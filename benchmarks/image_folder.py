"""A folder of real JPEGs as a dataset: images/s of one epoch decoded per item (no cache) against
the decode-once cache (``vpns_core.image_folder.decoded``), side by side in one run.

The folder is written from the embedded data: Fashion-MNIST test images, upscaled to
``--jpeg-size`` px (a photo's decode cost) and saved as JPEG quality 90 in class folders. Three
measurements of the training split at ``--size`` px, each through a ``DataLoader`` with
``--workers`` workers: per-item decode and resize (what every epoch paid before), the first epoch
with the cache (decode once and write it), and a later epoch (read the memory-mapped cache).

    python -m benchmarks.image_folder --quick

Writes ``results/benchmarks/image_folder.json``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.harness import write_json
from sweeps.text_table import print_table
from vpns_core.data import RawSplit, ResizedImages, build_data


def write_folder(root: Path, per_class: int, size: int) -> int:
    test = build_data("fashion_mnist", None, 28, test_subset=None, train_subset=100, val_fraction=0.0).test
    images, labels = test.tensors()
    n = 0
    for k in range(10):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(torch.nonzero(labels == k).flatten()[:per_class].tolist()):
            img = Image.fromarray(images[i, 0].numpy()).convert("RGB").resize((size, size), Image.BICUBIC)
            img.save(folder / f"{j:05d}.jpg", quality=90)
            n += 1
    return n


def epoch_rate(dataset, workers: int, batch: int) -> tuple[float, float]:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    seen = sum(len(y) for _, y in loader)
    seconds = time.perf_counter() - start
    return seen / seconds, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=200, help="images per class (10 classes)")
    p.add_argument("--jpeg-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--size", type=int, default=64, help="side the trial reads (input_size)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="40 images per class, 128 px JPEGs")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.jpeg_size = 40, 128
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VPNS_CACHE"] = str(Path(tmp) / "cache-setup")
        n = write_folder(Path(tmp) / "photos", args.per_class, args.jpeg_size)
        splits = build_data("image_folder", str(Path(tmp) / "photos"), args.size, val_fraction=0.0)
        raw, idx = splits.train_eval.raw, splits.train_eval.indices
        uncached = ResizedImages(RawSplit(raw.source, raw.labels, raw.classes), idx, args.size)
        before, before_s = epoch_rate(uncached, args.workers, args.batch)
        os.environ["VPNS_CACHE"] = str(Path(tmp) / "cache-measured")  # empty: the cache is written
        start = time.perf_counter()
        cached = ResizedImages(raw, idx, args.size)
        build_s = time.perf_counter() - start
        _, first_s = epoch_rate(cached, args.workers, args.batch)
        first = len(cached) / (build_s + first_s)
        later, later_s = epoch_rate(ResizedImages(raw, idx, args.size), args.workers, args.batch)
        same = torch.equal(uncached.tensors()[0], cached.tensors()[0])
    rows = [["decoded per item (before)", f"{before:,.0f}", f"{before_s:.2f}", "1.00"],
            ["first, writing the cache", f"{first:,.0f}", f"{build_s + first_s:.2f}", f"{first / before:.2f}"],
            ["later, from the cache", f"{later:,.0f}", f"{later_s:.2f}", f"{later / before:.2f}"]]
    print_table(f"{len(idx)} training images of {n} JPEGs ({args.jpeg_size} px, quality 90) read at "
                f"{args.size} px, batch {args.batch}, {args.workers} workers, {args.threads} thread(s); "
                f"cached pixels equal the decoded ones: {same}",
                ["epoch", "images/s", "seconds", "x before"], rows)
    result = {"args": vars(args), "images": len(idx), "same_pixels": same,
              "before_images_per_s": before, "first_epoch_images_per_s": first,
              "cached_epoch_images_per_s": later}
    write_json("image_folder", result, args.out)
    return result


if __name__ == "__main__":
    main()
