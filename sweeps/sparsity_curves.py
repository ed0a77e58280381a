"""Accuracy against sparsity with dense fine-tuning as the reference line (its own phase: it does
not depend on sparsity). A grid, as the figure needs every point.

Default preset: the headline, VPNs, HYDRA and OMP at 90% sparsity and dense fine-tuning, at the
preset's three seeds; ``--full`` runs every registered pruning method at every sparsity level
(the paper preset always does).
"""
import sys

from search_spaces import method, sparsity
from sweeps.sweep import run_sweep


def flags(parser):
    parser.add_argument("--full", action="store_true",
                        help="every registered pruning method at every sparsity level of the "
                             "preset, not only the headline (VPNs, HYDRA, OMP at 90%%)")
    return ["full"]


def plan(sweep):
    headline = sparsity.headline(sweep.preset)
    full = sweep.args.full or headline is None
    base = sparsity.base(sweep.preset, full=full)
    space = {**method.space(sweep.preset), **sparsity.space(sweep.preset)} if full else headline
    sweep.run_phase("pruned", base, space)
    sweep.run_phase("dense", base, {"method": method.reference_methods()})


def main(argv=None):
    return run_sweep("sparsity_curves", plan, argv, doc=__doc__, search="grid", scheduler="fifo",
                     flags=flags)


if __name__ == "__main__":
    sys.exit(main())
