"""Channel pruning speed-up: dense vs channel-pruned models, side by side in one run.

For each architecture and channel sparsity, the model's channels are removed by torch-pruning
(DepGraph importance at the initial weights: the timing depends only on the shapes, which every
channel method shares at a given sparsity) and :func:`vpns_core.channel_pruning.compare` measures the
dense and the pruned model one after the other: parameters, FLOPs per image, latency and
throughput at batch 1 and ``--batch``, peak inference memory, training step time and memory.
Printed as ratios (pruned ÷ dense; speed-up = dense ÷ pruned time).

    python -m benchmarks.structured_speedup                          # 112 px, resnet18 + lite0
    python -m benchmarks.structured_speedup --size 224 --threads 2
    python -m benchmarks.structured_speedup --quick                  # tiny_resnet, 32 px

Writes ``results/benchmarks/structured_speedup.json``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import amp_dtype, write_json
from sweeps.text_table import print_table
from vpns_core.models import build_model, head_layer
from vpns_core.channel_pruning import ChannelPruner
from vpns_core.costs import compare
from vpns_core.methods import METHODS


def pruned_copy(name: str, size: int, sparsity: float, device: torch.device):
    model = build_model(name, pretrained=False).module.to(device).eval()
    cp = ChannelPruner(model, torch.zeros(1, 3, size, size, device=device), sparsity,
                       method=METHODS.get("depgraph")(), ignored=(head_layer(model)[1],))
    cp.remove(cp.plan())
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "efficientnet_lite0"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="time under autocast (bf16 where supported, else "
                   "fp16), as a CUDA trial with amp=True runs")
    p.add_argument("--quick", action="store_true", help="tiny_resnet at 32 px, batch 16, 2 repeats")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.size, args.batch, args.repeats = ["tiny_resnet"], 32, 16, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, results = [], []
    for name in args.models:
        dense = build_model(name, pretrained=False).module.to(device)
        for s in args.sparsities:
            r = compare(dense, pruned_copy(name, args.size, s, device), args.size, device=device,
                        batches=(1, args.batch), repeats=args.repeats, amp_dtype=amp_dtype(args.amp, device))
            results.append({"model": name, "channel_sparsity": s, **r})
            rows.append([name, s, r["params_ratio"], r["flops_ratio"], r["speedup_b1"], r["speedup"],
                         r["memory_ratio"], r["train_speedup"], r["train_memory_ratio"],
                         r["dense_latency_ms_b1"], r[f"pruned_latency_ms_b{args.batch}"]])
    print_table(f"Channel pruning, dense vs pruned ({args.size} px, batch 1 and {args.batch}, "
                f"{device}, {args.threads} threads; ratios pruned ÷ dense, speed-up dense ÷ pruned)",
                ["model", "sparsity", "params", "FLOPs", "speed-up b1", f"speed-up b{args.batch}",
                 "memory", "train speed-up", "train memory", "dense ms b1", f"pruned ms b{args.batch}"], rows)
    write_json("structured_speedup", {"args": vars(args), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
