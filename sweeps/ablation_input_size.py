"""Input-size ablation: accuracy against the size the image is resized to inside a fixed frame
(pad fixed). Optuna (TPE) over input size and both learning rates, ASHA early stopping;
``--search grid --scheduler fifo`` runs the exact grid of the figure at the preset's rates.
"""
import sys

from search_spaces import input_size
from sweeps.common import run_sweep


def plan(sweep):
    sweep.run_phase("trials", input_size.base(sweep.preset), input_size.space(sweep.preset))


def main(argv=None):
    return run_sweep("ablation_input_size", plan, argv, doc=__doc__, num_samples=10)


if __name__ == "__main__":
    sys.exit(main())
