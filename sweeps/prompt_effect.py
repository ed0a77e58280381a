"""The investigation behind the default: VPNs against HYDRA under controlled changes of the
prompt's learning rate (inert), the protocol, the geometry, the sparsity, the mask learning rate
and the budget, at every seed (search_spaces/prompt_effect.py). One Tune experiment per phase;
``--phases`` runs some of them. The printed tables give mean ± std over seeds per setting.
"""
import sys

from search_spaces import prompt_effect
from sweeps.sweep import run_sweep
from sweeps.errors import UsageError


def flags(parser):
    parser.add_argument("--phases", nargs="+", default=None, metavar="PHASE",
                        help="phases to run, in order (default: all of the preset's: "
                             f"{', '.join(prompt_effect.PHASES)})")
    return ["phases"]


def plan(sweep):
    known = prompt_effect.phases(sweep.preset)
    chosen = sweep.args.phases or list(known)
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise UsageError(f"--phases {unknown[0]}: unknown phase; choose from {', '.join(known)}")
    base = prompt_effect.base(sweep.preset)
    for name in chosen:
        sweep.run_phase(name, base, {"setting": known[name]})


def main(argv=None):
    return run_sweep("prompt_effect", plan, argv, doc=__doc__, search="grid", scheduler="fifo",
                     flags=flags)


if __name__ == "__main__":
    sys.exit(main())
