"""Architecture comparison: VPNs and HYDRA on each source architecture, searched with both
learning rates."""
import sys

from search_spaces import architecture
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(architecture)


def main(argv=None):
    return run_sweep("architectures", plan, argv, doc=__doc__, num_samples=8)


if __name__ == "__main__":
    sys.exit(main())
