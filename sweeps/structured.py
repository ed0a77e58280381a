"""Structured (channel) pruning: accuracy, measured speed-up and memory against channel sparsity
for structured VPNs, Network Slimming and DepGraph (torch-pruning removes the channels), with
dense fine-tuning as the reference line. Every trial measures its pruned model against the
dense one (parameters, FLOPs, latency and throughput at batch 1 and 64, peak memory, training
step time and memory) and logs the ratios to MLflow; ``python -m analysis structured`` draws it.
"""
import sys

from search_spaces import method, structured
from sweeps.sweep import run_sweep


def plan(sweep):
    base = structured.base(sweep.preset)
    sweep.run_phase("pruned", base, structured.space(sweep.preset))
    sweep.run_phase("dense", base, {"method": method.reference_methods()})


def main(argv=None):
    return run_sweep("structured", plan, argv, doc=__doc__, search="grid", scheduler="fifo")


if __name__ == "__main__":
    sys.exit(main())
