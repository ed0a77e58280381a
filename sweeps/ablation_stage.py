"""VP-stage ablation: the prompt in both stages, only in mask finding, only in weight tuning,
or never (HYDRA), searched with both learning rates."""
import sys

from search_spaces import vp_stage
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(vp_stage)


def main(argv=None):
    return run_sweep("ablation_stage", plan, argv, doc=__doc__, num_samples=12)


if __name__ == "__main__":
    sys.exit(main())
