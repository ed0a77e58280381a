"""Accuracy against sparsity for every registered pruning method (× seeds), with dense
fine-tuning as the reference line (its own phase: it does not depend on sparsity). A grid by
default, as the figure needs every point.
"""
import sys

from search_spaces import method, sparsity
from sweeps.common import run_sweep


def plan(sweep):
    base = sparsity.base(sweep.preset)
    sweep.run_phase("pruned", base, {**method.space(sweep.preset), **sparsity.space(sweep.preset)})
    sweep.run_phase("dense", base, {"method": method.reference_methods()})


def main(argv=None):
    return run_sweep("sparsity_curves", plan, argv, doc=__doc__, search="grid", scheduler="fifo")


if __name__ == "__main__":
    sys.exit(main())
