"""Input pipeline: images/s of each part of the data path next to the model's training step.

Stages, each timed on its own in one run (images/s, median over repeats):

- ``loader``: a ``DataLoader`` over the training split (read/decode, resize, collate) with
  ``--workers`` 0 and N (steady state: persistent workers already running); for file datasets
  the JPEG decode and resize happen here;
- ``loader first batch``: seconds until a new loader yields its first batch (worker start-up)
  vs the next epoch of a persistent loader;
- ``to device + crop/flip``: uint8 -> float on the device and the batched random crop and flip;
- ``prompt + normalise``: the prompt and normalisation, batched on the device;
- ``model step``: one training step of the trial (forward, backward, optimiser) on the same batch;
- ``training loop``: an epoch of the trial's own loader (``Feed.loader``) feeding the step,
  with the share of its time spent waiting for the next batch (the model starves if it is large).

Two datasets: the embedded Fashion-MNIST (resized once and held in memory) and a synthetic
Tiny-ImageNet folder of JPEG photos-like images written to a temporary folder (decode and resize
per item, the case of the paper's file datasets). Ratios: each data stage's images/s ÷ the model
step's; above 1 the data path keeps up.

    python -m benchmarks.input_pipeline                 # both datasets
    python -m benchmarks.input_pipeline --quick         # fewer images and repeats

Writes ``results/benchmarks/input_pipeline.json``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import write_json
from sweeps.text_table import print_table
from vpns_core.config import Config
from vpns_core.data import random_crop_flip
from vpns_core.train import Trial


def write_jpeg_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    """A Tiny-ImageNet layout of smooth colour images with noise, JPEG quality 90 (decode cost
    close to a photo's of that size)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = root / "tiny-imagenet-200"
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
            folder = base / split / wnid / ("images" if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a, b, p = rng.uniform(0.01, 0.05, 3), rng.uniform(0, 6, 3), rng.uniform(0, 255, 3)
                img = np.stack([p[k] / 2 + 60 * np.sin(a[k] * xx + b[k]) * np.cos(a[k] * yy)
                                for k in range(3)], -1) + rng.normal(0, 12, (h, w, 3))
                Image.fromarray(np.clip(img + 64, 0, 255).astype(np.uint8)).save(
                    folder / f"{wnid}_{i}.JPEG", quality=90)


def median_rate(fn, images: int, repeats: int) -> tuple[float, float]:
    """(images/s, seconds) of the median of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return images / t, t


def bench_dataset(label: str, cfg: Config, workers: list[int], repeats: int, workdir: str) -> list[dict[str, Any]]:
    trial = Trial(cfg, workdir, resume=False)
    trial.model.train()
    data = trial.data.train
    batch = cfg.batch_size
    n_images = (len(data) // batch) * batch
    rows: list[dict[str, Any]] = []

    def add(stage: str, rate: float, seconds: float, **extra: Any) -> None:
        rows.append({"dataset": label, "stage": stage, "images_per_s": rate, "seconds": seconds, **extra})

    for w in workers:
        def loader(w=w, persistent=False):
            return torch.utils.data.DataLoader(
                data, batch_size=batch, shuffle=True, drop_last=True, num_workers=w,
                pin_memory=trial.device.type == "cuda", persistent_workers=persistent and w > 0,
                generator=torch.Generator().manual_seed(0))

        def epoch(dl):
            for _ in dl:
                pass

        dl = loader(persistent=True)  # steady state: workers already running (w > 0)
        rate, t = median_rate(lambda: epoch(dl), n_images, repeats)
        add(f"loader, {w} workers{' (persistent)' if w else ''}", rate, t, workers=w)
        firsts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            next(iter(loader()))
            firsts.append(time.perf_counter() - t0)
        add(f"loader first batch, new loader, {w} workers", None, statistics.median(firsts), workers=w)
        if w > 0:
            starts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                it = iter(dl)
                next(it)
                starts.append(time.perf_counter() - t0)
                for _ in it:
                    pass
            add(f"loader first batch, persistent, {w} workers", None, statistics.median(starts), workers=w)
        del dl

    x8, y = next(iter(torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)))
    gen = torch.Generator(device=trial.device).manual_seed(0)

    def device_part():
        x, _ = trial.feed.to_device(x8, y)
        return random_crop_flip(x, cfg.input_size, gen)

    rate, t = median_rate(device_part, batch, repeats * 3)
    add("to device + crop/flip", rate, t)
    xd = device_part()
    with torch.no_grad():
        rate, t = median_rate(lambda: trial.prompt(xd, enabled=True), batch, repeats * 3)
    add("prompt + normalise", rate, t)
    opt = torch.optim.SGD(trial.model.parameters(), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    yd = y.to(trial.device)
    rate, t = median_rate(lambda: trial.loop.train_step(opt, sched, xd, yd, prompted=True), batch, repeats)
    add("model step (train, prompted)", rate, t)

    # The real loop: time spent in next(loader) vs in the step, one epoch per worker count.
    for w in workers:
        trial.cfg = cfg.replace(num_workers=w)
        wait = step = 0.0
        seen = 0
        it = iter(trial.loader(data, train=True, generator=torch.Generator().manual_seed(1)))
        while True:
            t0 = time.perf_counter()
            try:
                xb, yb = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x, yy = trial.feed.to_device(xb, yb)
            trial.loop.train_step(opt, sched, random_crop_flip(x, cfg.input_size, gen), yy, prompted=True)
            step += time.perf_counter() - t1
            wait += t1 - t0
            seen += len(yb)
        add(f"training loop, {w} workers", seen / (wait + step), wait + step,
            loader_wait_share=wait / (wait + step), workers=w)
    trial.cfg = cfg
    model_rate = next(r["images_per_s"] for r in rows if r["stage"].startswith("model step"))
    for r in rows:
        r["ratio_vs_model_step"] = r["images_per_s"] / model_rate if r["images_per_s"] is not None else None
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to compare")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=512, help="training images per dataset")
    p.add_argument("--files-model", default="resnet18", help="model for the JPEG dataset (random init)")
    p.add_argument("--files-size", type=int, default=112, help="input = output size for the JPEG dataset")
    p.add_argument("--jpeg-size", type=int, nargs=2, default=[375, 500], help="stored JPEG height width")
    p.add_argument("--datasets", nargs="+", default=["embedded", "jpeg"], choices=("embedded", "jpeg"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="the trial's mixed precision (bf16 where supported, "
                   "else fp16 with loss scaling); on CUDA only, as in trials")
    p.add_argument("--quick", action="store_true", help="128 images, batch 32, 2 repeats, 64 px JPEGs")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats, args.files_size = 128, 32, 2, 64
        args.jpeg_size = [128, 160]
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(train_subset=args.images, test_subset=16, val_fraction=0.0, batch_size=args.batch,
                      num_threads=args.threads, device=args.device, label_mapping_samples=64, amp=args.amp)
        if "embedded" in args.datasets:
            cfg = Config(**common)  # the embedded default: Lite0, Fashion-MNIST 48 px in 64 px
            rows += bench_dataset("fashion_mnist (in memory)", cfg, args.workers, args.repeats, f"{tmp}/e")
        if "jpeg" in args.datasets:
            root = Path(tmp) / "data"
            classes = 8
            write_jpeg_folder(root, classes, -(-args.images // classes) + 1, tuple(args.jpeg_size))
            cfg = Config(**common, dataset="tiny_imagenet", data_root=str(root), model=args.files_model,
                         pretrained=False, head="linear", input_size=args.files_size,
                         output_size=args.files_size, pad_size=max(1, args.files_size // 14))
            rows += bench_dataset(f"JPEG {args.jpeg_size[1]}x{args.jpeg_size[0]} files", cfg, args.workers,
                                  args.repeats, f"{tmp}/j")
    print_table(f"input pipeline ({args.device}, {args.threads} torch thread(s), batch {args.batch}; "
                f"ratio = images/s ÷ model step's)",
                ["dataset", "stage", "images/s", "s", "x model step", "loader wait"],
                [[r["dataset"], r["stage"], r["images_per_s"] if r["images_per_s"] is not None else "",
                  r["seconds"],
                  r["ratio_vs_model_step"] if r["ratio_vs_model_step"] is not None else "",
                  f"{r['loader_wait_share']:.1%}" if "loader_wait_share" in r else ""] for r in rows])
    payload = {"args": vars(args), "results": rows}
    write_json("input_pipeline", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
