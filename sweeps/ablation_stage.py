"""VP-stage ablation: the prompt in both stages, only in mask finding, only in weight tuning,
or never (HYDRA). Optuna (TPE) over the stage and both learning rates, ASHA early stopping;
``--search grid --scheduler fifo`` runs the exact grid of the figure.
"""
import sys

from search_spaces import vp_stage
from sweeps.common import run_sweep


def plan(sweep):
    sweep.run_phase("trials", vp_stage.base(sweep.preset), vp_stage.space(sweep.preset))


def main(argv=None):
    return run_sweep("ablation_stage", plan, argv, doc=__doc__, num_samples=12)


if __name__ == "__main__":
    sys.exit(main())
