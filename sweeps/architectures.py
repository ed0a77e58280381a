"""Architecture comparison: VPNs and HYDRA on each source architecture. Optuna (TPE) over
architecture, method and both learning rates, ASHA early stopping; ``--search grid
--scheduler fifo`` runs every architecture × method at the preset's rates.
"""
import sys

from search_spaces import architecture
from sweeps.common import run_sweep


def plan(sweep):
    sweep.run_phase("trials", architecture.base(sweep.preset), architecture.space(sweep.preset))


def main(argv=None):
    return run_sweep("architectures", plan, argv, doc=__doc__, num_samples=8)


if __name__ == "__main__":
    sys.exit(main())
