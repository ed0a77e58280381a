"""Pad-size ablation: accuracy against the width of the pad prompt at a fixed input size.

Default: the embedded Lite0 -> Fashion-MNIST task at 90% sparsity, 32 px images in a 64 px frame,
no prompt and pads 4, 8, 12, 16, 24, as a grid (FIFO): the full figure in under 15 minutes on 2
CPUs (six trials, two at a time, one torch thread each).
``--search optuna --scheduler asha`` searches pad and learning rates instead.
"""
import sys

from search_spaces import pad_size
from sweeps.common import run_sweep


def plan(sweep):
    sweep.run_phase("trials", pad_size.base(sweep.preset), pad_size.space(sweep.preset))


def main(argv=None):
    return run_sweep("ablation_pad", plan, argv, doc=__doc__, search="grid", scheduler="fifo")


if __name__ == "__main__":
    sys.exit(main())
