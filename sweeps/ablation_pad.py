"""Pad-size ablation: accuracy against the width of the pad prompt at a fixed input size, against
the two controls that take the pads' exact updates (search_spaces/pad_size.py).

Default: the embedded Lite0 -> Fashion-MNIST task at 90% sparsity in the authors' loop and layout
(a 64 px image, the prompt over its border; evaluated without the prompt): pads 4 and 8, the pad
frozen at zero, and no prompt with as many updates, at seeds 7, 9 and 17 (12 trials), as a grid
(FIFO), two trials at a time with one torch thread each. The caption tests each pad against each
control, paired by seed (Holm over the four). ``--search optuna --scheduler asha`` searches pad
and learning rates instead.
"""
import sys

from search_spaces import pad_size
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(pad_size)


def main(argv=None):
    return run_sweep("ablation_pad", plan, argv, doc=__doc__, search="grid", scheduler="fifo")


if __name__ == "__main__":
    sys.exit(main())
