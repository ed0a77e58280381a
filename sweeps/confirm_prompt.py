"""The pre-registered confirmation of what the prompt adds (README, "Confirmation"): five arms
of the embedded default at ten new seeds on a new test subset (search_spaces/confirmation.py),
as a grid, two trials at a time with one torch thread each (about 1.5 hours on 2 CPUs). The
analysis tests H1-H3 with paired t-intervals, Holm-corrected (``python -m analysis``), and
``--csv`` writes the per-seed numbers the README's table comes from.
"""
import sys

from search_spaces import confirmation
from sweeps.sweep import run_sweep, single_phase

plan = single_phase(confirmation)


def main(argv=None):
    return run_sweep("confirm_prompt", plan, argv, doc=__doc__, search="grid", scheduler="fifo",
                     seeds=confirmation.seeds)


if __name__ == "__main__":
    sys.exit(main())
