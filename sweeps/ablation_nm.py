"""N:M study (issue 30): VPNs against the frozen pad, HYDRA and OMP with as many updates, at 2:4
semi-structured and at 50% unstructured sparsity (search_spaces/nm.py), the preset's seeds, as a
grid. The figure tests what the prompt adds under each pattern, paired by seed (Holm over the
figure's comparisons). Default preset: 24 trials of the embedded task, about 45 minutes on 2 CPUs.
"""
import sys

from search_spaces import nm
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(nm)


def main(argv=None):
    return run_sweep("ablation_nm", plan, argv, doc=__doc__, search="grid", scheduler="fifo")


if __name__ == "__main__":
    sys.exit(main())
