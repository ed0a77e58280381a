"""The pre-registered confirmation of what the prompt adds (README, "Confirmation"): five arms
of the embedded default at ten new seeds on a new test subset (search_spaces/confirmation.py),
as a grid, two trials at a time with one torch thread each (about 1.5 hours on 2 CPUs). The
figure tests H1-H3 as planned (paired t-intervals, Holm over the three) and its CSV holds every
per-seed number. ``--arms`` runs some arms only (the thread-count rerun of the plan:
``--arms pad8 pad8_frozen --seeds 101 102 103 --cpus-per-trial 2 --max-concurrent 1``).
"""
import sys

from search_spaces import confirmation
from sweeps.errors import UsageError
from sweeps.sweep import run_sweep


def flags(parser):
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help=f"arms to run (default: all: {', '.join(confirmation.ARMS)})")
    return ["arms"]


def plan(sweep):
    arms = sweep.args.arms or list(confirmation.ARMS)
    unknown = [a for a in arms if a not in confirmation.ARMS]
    if unknown:
        raise UsageError(f"--arms {unknown[0]}: unknown arm; choose from {', '.join(confirmation.ARMS)}")
    if len(set(arms)) < len(arms):
        raise UsageError(f"--arms: {', '.join(arms)} names an arm twice")
    space = {"arm": {a: confirmation.ARMS[a] for a in arms}}
    sweep.run_phase("trials", confirmation.base(sweep.preset), space)


def main(argv=None):
    return run_sweep("confirm_prompt", plan, argv, doc=__doc__, search="grid", scheduler="fifo",
                     flags=flags, seeds=confirmation.seeds)


if __name__ == "__main__":
    sys.exit(main())
