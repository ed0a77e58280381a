"""Masked-step overhead: time per training step of VPNs stage 1 and stage 2 ÷ a dense step.

Every variant is the real training step of :class:`vpns_core.loop.Loop` (``Loop.train_step``:
prompt, model, label mapping, cross-entropy, backward, optimiser and scheduler step) on the same
ResNet-18 (torchvision, random init, no download), batch and input, timed round-robin in one
process (median of ``--iters`` after ``--warmup``):

- ``dense``: all weights, SGD + momentum, no prompt (dense fine-tuning);
- ``stage1``: VPNs mask finding: scores + pad prompt with Adam, weights frozen, straight-through
  top-k under one global threshold (the reference's allocation), recomputed after every step;
- ``stage2``: VPNs weight tuning: fixed mask, weights + prompt with SGD;
- ``dense_prompt``: dense fine-tuning with the same prompt (the ``dense`` method with VP on);
- ``stage1_noprompt`` / ``stage2_noprompt``: the stages without the prompt (HYDRA).

The ``x dense`` column is the issue's ratio (each variant ÷ the plain dense step); ``x same
prompt`` divides by the dense step with the same prompt setting, i.e. the cost of the masks
alone (the prompt's own cost is mostly the input gradient of the first convolution, which
dense fine-tuning never computes). On a CPU the ratios use process CPU time by default
(``--clock cpu``): the machine may be shared, and waiting for a core is not the step's cost.

``--layout both`` times every variant twice, in the contiguous (NCHW) and the channels_last
(NHWC) memory format, round-robin in the same run, and adds the column ``x NCHW`` (NHWC time ÷
NCHW time of the same variant): the measure behind ``Config.channels_last``'s default.

Targets (issue #7): stage 2 ≤ 1.10x dense, stage 1 ≤ 1.25x dense. ``--profile`` adds a
torch.profiler table of the most expensive operators per variant.

    python -m benchmarks.masked_step                      # 32 px (batch 64) and 224 px (batch 16)
    python -m benchmarks.masked_step --quick              # 32 px only, fewer iterations
    python -m benchmarks.masked_step --sizes 224 --batch 32 --threads 2 --profile
    python -m benchmarks.masked_step --model efficientnet_lite0 --sizes 64 --batch 64 --pads 8 \
        --allocation erk --layout both --variants stage1 stage2          # the embedded default

Writes ``results/benchmarks/masked_step.json``.
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from benchmarks.harness import interleaved_medians, write_json
from sweeps.text_table import print_table
from vpns_core.config import Config
from vpns_core.train import Trial

VARIANTS = ("dense", "stage1", "stage2", "dense_prompt", "stage1_noprompt", "stage2_noprompt",
            "stage1_nm", "stage2_nm")
#: variants measured by default (the N:M ones with ``--variants ... stage1_nm stage2_nm``)
DEFAULT_VARIANTS = VARIANTS[:6]
TARGETS = {"stage1": 1.25, "stage2": 1.10, "stage1_nm": 1.25, "stage2_nm": 1.10}


LAYOUTS = {"auto": None, "nchw": False, "nhwc": True}


def make_trial(size: int, pad: int, batch: int, args: argparse.Namespace, workdir: str,
               layout: str = "auto", variant: str = "") -> Trial:
    """The benchmark's trial; an ``_nm`` variant has ``args.pattern`` masks (e.g. 2:4, sparsity
    1 - n/m) instead of unstructured ones at ``args.sparsity``."""
    nm = variant.endswith("_nm")
    n, m = (int(v) for v in args.pattern.split(":"))
    cfg = Config(channels_last=LAYOUTS[layout], model=args.model, pretrained=False, dataset="fashion_mnist", train_subset=batch,
                 test_subset=16, val_fraction=0.0, input_size=size, output_size=size,
                 pad_size=pad, method="vpns", sparsity=1 - n / m if nm else args.sparsity,
                 pattern=args.pattern if nm else "unstructured", allocation=args.allocation,
                 batch_size=batch, num_threads=args.threads, device=args.device,
                 label_mapping_samples=16, amp=args.amp)
    return Trial(cfg, workdir, resume=False)


def prepare(trial: Trial, variant: str):
    """Put the trial's network in the variant's mode and build its optimiser and scheduler the
    way ``Loop.run_stage`` does; returns ``step() -> None``."""
    cfg = trial.cfg
    prompted = not variant.endswith("noprompt") and variant != "dense"  # dense_prompt: prompted
    if variant.startswith("stage1"):
        groups = [{"params": trial.net.attach_scores(), "lr": cfg.mask_lr}]
        kind = "adam"
    else:
        if variant.startswith("stage2"):
            trial.net.attach_scores()
            trial.net.fix()
        groups = [{"params": list(trial.model.parameters()), "lr": cfg.tune_lr}]
        kind = "sgd"
    if prompted:
        groups.append({"params": trial.assembly.prompt_params(), "lr": cfg.mask_lr})
    opt = trial.loop.optimizer(kind, groups)  # the loop's own optimizer and step, not copies
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    trial.model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, cfg.input_size, cfg.input_size, generator=gen).to(trial.device)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=gen).to(trial.device)

    def step() -> None:
        trial.loop.train_step(opt, sched, x, y, prompted=prompted)

    return step


def profile(steps: dict[str, Any], n: int, top: int) -> dict[str, list[dict[str, Any]]]:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    out = {}
    for name, step in steps.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / n,
                      "calls_per_step": e.count / n} for e in events]
        print_table(f"profile: {name} (self CPU ms per step, top {top})", ["op", "self ms", "calls"],
                    [[r["op"][:60], r["self_ms_per_step"], r["calls_per_step"]] for r in out[name]])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="input = output sizes (px)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="batch per size (one value: all)")
    p.add_argument("--pads", type=int, nargs="+", default=[4, 16], help="pad width per size")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--allocation", default="global", choices=("global", "layerwise", "erk"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                   help="stage1_nm / stage2_nm: the same steps with --pattern masks")
    p.add_argument("--pattern", default="2:4", help="N:M of the _nm variants (default 2:4)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="time the ratios use (default: cpu on a CPU device, wall on CUDA)")
    p.add_argument("--layout", choices=("auto", "nchw", "nhwc", "both"), default="auto",
                   help="memory format of the model and inputs (auto: Config's default; both: "
                        "each variant in NCHW and NHWC, side by side)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table per variant")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="the trial's mixed precision (bf16 where supported, "
                   "else fp16 with loss scaling); on CUDA only, as in trials")
    p.add_argument("--quick", action="store_true", help="32 px only, 1 warm-up, 6 iterations")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. 'before')")
    p.add_argument("--out", default=None, help="JSON path (default results/benchmarks/masked_step.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.pads, args.warmup, args.iters = [32], [64], [4], 1, 6
    torch.set_num_threads(args.threads)
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]
    per_size = lambda values, i: values[i] if i < len(values) else values[-1]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    results, rows, profiles = [], [], {}
    for i, size in enumerate(args.sizes):
        batch, pad = per_size(args.batch, i), per_size(args.pads, i)
        with tempfile.TemporaryDirectory() as tmp:
            steps = {(lay, v): prepare(make_trial(size, pad, batch, args, f"{tmp}/{lay}-{v}", lay, v),
                                       v.removesuffix("_nm"))
                     for lay in layouts for v in args.variants}
            named = {f"{v} {lay}": step for (lay, v), step in steps.items()}
            by_name = interleaved_medians(named, args.warmup, args.iters, sync)
            timing = {key: by_name[f"{key[1]} {key[0]}"] for key in steps}
            if args.device.startswith("cuda"):  # each variant's own peak: one step above what is resident
                for key, step in steps.items():
                    torch.cuda.synchronize()
                    resident = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    timing[key] = {**timing[key],
                                   "step_peak_gib": (torch.cuda.max_memory_allocated() - resident) / 2**30}
            if args.profile:
                profiles[f"{size}px"] = profile(named, args.profile_steps, 15)
        clock = "" if args.clock == "wall" else "cpu_"
        for lay in layouts:
            base = {v: timing[lay, "dense_prompt" if "dense_prompt" in args.variants
                               and not v.endswith("noprompt") and v != "dense" else "dense"][f"{clock}median_s"]
                    for v in args.variants}
            dense = timing[lay, "dense"][f"{clock}median_s"]
            for v in args.variants:
                t = timing[lay, v]
                median = t[f"{clock}median_s"]
                ratio, same = median / dense, median / base[v]
                vs_nchw = median / timing["nchw", v][f"{clock}median_s"] if "nchw" in layouts else None
                target = TARGETS.get(v)
                results.append({"size": size, "batch": batch, "pad": pad, "variant": v,
                                "layout": lay, **t, "clock": args.clock, "ratio_vs_dense": ratio,
                                "ratio_vs_dense_same_prompt": same, "ratio_vs_nchw": vs_nchw,
                                "wall_ratio_vs_dense": t["median_s"] / timing[lay, "dense"]["median_s"],
                                "target": target, "images_per_s": batch / t["median_s"]})
                rows.append([f"{size}px b{batch}", v, lay, median * 1000, t[f"{clock}q1_s"] * 1000,
                             t[f"{clock}q3_s"] * 1000, t["median_s"] * 1000, ratio, same,
                             "" if vs_nchw is None else vs_nchw, f"<= {target}" if target else "",
                             ("ok" if ratio <= target else "MISS") if target else "",
                             f"{t['step_peak_gib']:.2f}" if "step_peak_gib" in t else "-"])
    print_table(f"masked-step overhead: {args.model}, sparsity {args.sparsity} ({args.allocation}), "
                f"{args.threads} thread(s), {args.device}, median of {args.iters} ({args.clock} time)",
                ["input", "variant", "layout", "ms/step", "q1", "q3", "wall ms", "x dense",
                 "x same prompt", "x NCHW", "target", "", "step peak GiB"], rows)
    payload = {"args": vars(args), "results": results, "profiles": profiles}
    write_json("masked_step", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
