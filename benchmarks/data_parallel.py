"""Data-parallel trials: images/s of 1 and 2 workers side by side, and the cost of the paper's
ImageNet ResNet-50 setting on 4 or 8 GPUs.

**Throughput.** The real VPNs steps (``Loop.train_step`` of stage 1, scores + prompt with Adam,
and stage 2, fixed mask with weights + prompt and SGD) at the same global batch, timed in rounds
in one run (each round every variant takes ``--steps`` steps, so load changes hit all alike):

- ``1 worker x 1 thread``: one process, one torch thread;
- ``1 worker x 2 threads``: one process on the same two cores as the two workers;
- ``2 workers x 1 thread``: two processes of a gloo group (what ``--workers-per-trial 2`` runs),
  each on half of every batch, gradients averaged and BatchNorm statistics synchronised.

Images/s = global batch / median wall time of a step (rank 0's, which includes waiting for the
other rank). ``all-reduce ms`` is rank 0's time in the gradient all-reduce per step.

**Cost estimate** (``--estimate``). Training FLOPs per image (``torch.utils.flop_counter``, forward
and backward) of ResNet-18 and ResNet-50 at 224 px; a measured stage-1 step of ResNet-50 at
224 px on this device next to the step predicted from the ResNet-18 step by FLOPs (how well FLOPs
predict a step here); then GPU-hours per trial of the ImageNet setting: 1.15 M training images
(ImageNet minus the 10% validation split), 30 + 30 epochs of two passes per iteration (the
reference loop), at an *assumed* sustained GPU rate (``--gpu-tflops``), with the data-parallel
efficiency modelled from the bytes all-reduced per step (not overlapped with the backward pass)
and an assumed link bandwidth and latency. On a GPU (``--device cuda``) the ResNet-50 step is
measured there and replaces the assumed rate.

    python -m benchmarks.data_parallel                  # ResNet-18, 64 px, global batch 64
    python -m benchmarks.data_parallel --quick          # fewer rounds
    python -m benchmarks.data_parallel --estimate       # plus FLOPs and the ImageNet estimate

Writes ``results/benchmarks/data_parallel.json``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from benchmarks.harness import write_json
from sweeps.text_table import print_table
from vpns_core.config import Config

STAGES = ("stage1", "stage2")
IMAGENET_TRAIN = 1_281_167
IMAGENET_TEST = 50_000


def make_trial(args: argparse.Namespace, workdir: str, threads: int, model: str | None = None,
               size: int | None = None, batch: int | None = None):
    from vpns_core.train import Trial
    size = size or args.size
    cfg = Config(model=model or args.model, pretrained=False, dataset="fashion_mnist",
                 train_subset=max(batch or args.batch, 64), test_subset=16, val_fraction=0.0,
                 input_size=size, output_size=size, pad_size=max(1, size // 14), method="vpns",
                 sparsity=0.9, allocation="global", batch_size=batch or args.batch,
                 num_threads=threads, device=args.device, label_mapping_samples=16)
    return Trial(cfg, workdir, resume=False)


def prepare(trial, stage: str, rows: slice | None = None):
    """``step() -> None``: one training step of ``stage`` on a fixed batch (this rank's rows of
    it); the loop's own optimiser and step."""
    cfg = trial.cfg
    if stage == "stage1":
        groups = [{"params": trial.net.attach_scores(), "lr": cfg.mask_lr}]
        kind = "adam"
    else:
        trial.net.attach_scores()
        trial.net.fix()
        groups = [{"params": list(trial.model.parameters()), "lr": cfg.tune_lr}]
        kind = "sgd"
    groups.append({"params": trial.assembly.prompt_params(), "lr": cfg.mask_lr})
    opt = trial.loop.optimizer(kind, groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    trial.model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, cfg.input_size, cfg.input_size, generator=gen)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=gen)
    if rows is not None:
        x, y = x[rows], y[rows]
    x, y = x.to(trial.device), y.to(trial.device)

    def step() -> None:
        trial.loop.train_step(opt, sched, x, y, prompted=True)

    return step


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, commands, results) -> None:
    """A persistent rank: builds its trials, then runs ``(stage, n)`` commands and returns the
    per-step wall times and all-reduce times (rank 0)."""
    import torch.distributed as dist

    from vpns_core.distributed import DataParallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spent = [0.0]
    plain = DataParallel.average_gradients

    def timed(self, optimizer, loss):
        t0 = time.perf_counter()
        out = plain(self, optimizer, loss)
        spent[0] += time.perf_counter() - t0
        return out

    DataParallel.average_gradients = timed
    local = args.batch // world
    with tempfile.TemporaryDirectory() as tmp:
        steps = {s: prepare(make_trial(args, f"{tmp}/{s}", 1), s, slice(rank * local, (rank + 1) * local))
                 for s in STAGES}
        results.put(("ready", rank))
        while (command := commands[rank].get()) is not None:
            stage, n = command
            times, comm = [], []
            for _ in range(n):
                dist.barrier()
                spent[0] = 0.0
                t0 = time.perf_counter()
                steps[stage]()
                times.append(time.perf_counter() - t0)
                comm.append(spent[0])
            if rank == 0:
                results.put((times, comm))
    dist.destroy_process_group()


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(2)]
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, 2, port, args, commands, results)) for r in range(2)]
    for p in procs:
        p.start()
    timings: dict[tuple[str, str], list[float]] = {}
    comms: dict[str, list[float]] = {s: [] for s in STAGES}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = {s: prepare(make_trial(args, f"{tmp}/{s}", 1), s) for s in STAGES}
            for _ in range(2):
                assert results.get(timeout=600)[0] == "ready"
            for rnd in range(args.warmup_rounds + args.rounds):
                for stage in STAGES:
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        times = []
                        for _ in range(args.steps):
                            t0 = time.perf_counter()
                            local[stage]()
                            times.append(time.perf_counter() - t0)
                        if rnd >= args.warmup_rounds:
                            variant = f"1 worker x {threads} thread{'s' * (threads > 1)}"
                            timings.setdefault((stage, variant), []).extend(times)
                    for q in commands:
                        q.put((stage, args.steps))
                    times, comm = results.get(timeout=600)
                    if rnd >= args.warmup_rounds:
                        timings.setdefault((stage, "2 workers x 1 thread"), []).extend(times)
                        comms[stage].extend(comm)
    finally:
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=60)
    out = []
    for stage in STAGES:
        base = statistics.median(timings[stage, "1 worker x 1 thread"])
        for variant in ("1 worker x 1 thread", "1 worker x 2 threads", "2 workers x 1 thread"):
            times = timings[stage, variant]
            median = statistics.median(times)
            row = {"stage": stage, "variant": variant, "median_s": median, "steps": len(times),
                   "q1_s": statistics.quantiles(times, n=4)[0], "q3_s": statistics.quantiles(times, n=4)[2],
                   "images_per_s": args.batch / median, "speedup_vs_1x1": base / median}
            if variant.startswith("2 workers"):
                row["allreduce_ms"] = statistics.median(comms[stage]) * 1000
            out.append(row)
    return out


def training_flops(model: str, size: int) -> float:
    """FLOPs of one image's forward and backward pass (torch.utils.flop_counter, batch 2 / 2)."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode
    net = torchvision.models.get_model(model, weights=None)
    x = torch.rand(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / 2


def measured_step(args: argparse.Namespace, model: str, size: int, batch: int) -> float:
    """Median seconds of a VPNs stage-1 step of ``model`` at ``size`` px and ``batch`` here."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.threads)
        step = prepare(make_trial(args, tmp, args.threads, model=model, size=size, batch=batch), "stage1")
        step()
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        times = []
        for _ in range(args.estimate_steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate(args: argparse.Namespace, dp_rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = training_flops("resnet18", 224), training_flops("resnet50", 224)
    small_here = training_flops(args.model, args.size) if args.model in ("resnet18", "resnet50") else None
    r18 = next(r for r in dp_rows if r["stage"] == "stage1" and r["variant"] == "1 worker x 1 thread")
    predicted = r18["median_s"] / args.batch * large / small_here * args.estimate_batch if small_here else None
    measured = measured_step(args, "resnet50", 224, args.estimate_batch)
    flops_per_s = args.estimate_batch * large / measured
    gpu_rate = flops_per_s if args.device.startswith("cuda") else args.gpu_tflops * 1e12
    train_images = IMAGENET_TRAIN * 0.9
    passes = 2 * train_images * (args.epochs * 2)  # reference loop: 2 passes per iteration, 30 + 30
    evals = args.epochs * 2 * (2 * IMAGENET_TRAIN * 0.1 + IMAGENET_TEST) / 3  # val x2 (+ test), forward only
    total = (passes * args.vpns_overhead + evals) * large
    one_gpu_h = total / gpu_rate / 3600
    params = 25.6e6  # ResNet-50: scores (stage 1) or weights (stage 2) all-reduced every step
    rows = []
    for gpus in (1, 4, 8):
        local = args.global_batch / gpus
        compute = local * large * args.vpns_overhead / gpu_rate  # one pass of one GPU's share
        if gpus == 1:
            comm = 0.0
        else:
            comm = (2 * (gpus - 1) / gpus * 4 * params / (args.link_gbps * 1e9)
                    + args.bn_layers * 2 * args.collective_latency_us * 1e-6)
        efficiency = compute / (compute + comm)
        hours = one_gpu_h / efficiency
        rows.append({"gpus": gpus, "per_gpu_batch": local, "step_compute_ms": compute * 1000,
                     "allreduce_ms": comm * 1000, "efficiency": efficiency, "gpu_hours": hours,
                     "wall_hours": hours / gpus})
    return {"train_flops_per_image": {"resnet18_224": small, "resnet50_224": large,
                                      f"{args.model}_{args.size}": small_here},
            "resnet50_step_s": measured, "resnet50_step_predicted_s": predicted,
            "achieved_tflops_here": flops_per_s / 1e12, "gpu_tflops_used": gpu_rate / 1e12,
            "gpu_rate_measured": args.device.startswith("cuda"), "image_passes": passes,
            "total_flops": total, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64, help="input = output size (px)")
    p.add_argument("--batch", type=int, default=64, help="global batch (even)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    p.add_argument("--estimate", action="store_true", help="FLOPs and the ImageNet ResNet-50 estimate")
    p.add_argument("--threads", type=int, default=1, help="threads of the --estimate ResNet-50 step")
    p.add_argument("--estimate-batch", type=int, default=8, help="batch of the measured ResNet-50 step")
    p.add_argument("--estimate-steps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="epochs per stage (paper: 30 + 30)")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--gpu-tflops", type=float, default=65.0,
                   help="ASSUMED sustained training rate of one GPU in TFLOP/s (default 65: an A100 "
                        "in bf16 at ~21%% of its dense peak, ~2,650 ResNet-50 images/s)")
    p.add_argument("--vpns-overhead", type=float, default=1.1,
                   help="VPNs step / dense step (benchmarks/masked_step.py measured 1.04-1.16x)")
    p.add_argument("--link-gbps", type=float, default=100.0,
                   help="ASSUMED all-reduce bus bandwidth in GB/s (NVLink within one node)")
    p.add_argument("--collective-latency-us", type=float, default=30.0,
                   help="ASSUMED latency of one small collective (SyncBatchNorm) in microseconds")
    p.add_argument("--bn-layers", type=int, default=53, help="BatchNorm layers of ResNet-50")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 2
    load = os.getloadavg()[0]
    rows = throughput(args)
    print_table(f"data-parallel VPNs steps: {args.model} at {args.size} px, global batch {args.batch}, "
                f"{args.device}; median of {args.rounds} rounds x {args.steps} steps; load average "
                f"{load:.1f} at the start on {os.cpu_count()} cores",
                ["stage", "variant", "ms/step", "q1", "q3", "images/s", "x 1x1", "all-reduce ms"],
                [[r["stage"], r["variant"], r["median_s"] * 1000, r["q1_s"] * 1000, r["q3_s"] * 1000,
                  r["images_per_s"], r["speedup_vs_1x1"], r.get("allreduce_ms", "")] for r in rows])
    payload: dict[str, Any] = {"args": vars(args), "load_avg_start": load, "results": rows}
    if args.estimate:
        est = estimate(args, rows)
        payload["estimate"] = est
        flops = est["train_flops_per_image"]
        print(f"\ntraining GFLOPs per image (forward + backward): ResNet-18 224 px "
              f"{flops['resnet18_224'] / 1e9:.2f}, ResNet-50 224 px {flops['resnet50_224'] / 1e9:.2f}")
        predicted = est["resnet50_step_predicted_s"]
        print(f"ResNet-50 224 px VPNs stage-1 step, batch {args.estimate_batch}, {args.device}: measured "
              f"{est['resnet50_step_s']:.2f} s" + (f", predicted from the {args.model} {args.size} px step "
              f"by FLOPs {predicted:.2f} s" if predicted else "") +
              f" ({est['achieved_tflops_here']:.3f} TFLOP/s here)")
        what = "measured" if est["gpu_rate_measured"] else "ASSUMED"
        print_table(f"ImageNet ResNet-50 VPNs trial, 30 + 30 epochs at 224 px, global batch "
                    f"{args.global_batch}: {est['image_passes'] / 1e6:.0f} M training image passes, "
                    f"{est['total_flops'] / 1e18:.2f} EFLOP; {what} GPU rate {est['gpu_tflops_used']:.0f} TFLOP/s",
                    ["GPUs", "batch/GPU", "compute ms/pass", "all-reduce ms", "efficiency", "GPU-hours", "hours"],
                    [[r["gpus"], r["per_gpu_batch"], r["step_compute_ms"], r["allreduce_ms"], r["efficiency"],
                      r["gpu_hours"], r["wall_hours"]] for r in est["rows"]])
    write_json("data_parallel", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
