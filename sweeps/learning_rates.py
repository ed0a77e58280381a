"""Learning-rate search: Optuna (TPE) over the mask-finding and weight-tuning learning rates of
VPNs at the preset's task, with ASHA stopping weak trials after the first epochs.
"""
import sys

from search_spaces import learning_rates
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(learning_rates)


def main(argv=None):
    return run_sweep("learning_rates", plan, argv, doc=__doc__, num_samples=12)


if __name__ == "__main__":
    sys.exit(main())
