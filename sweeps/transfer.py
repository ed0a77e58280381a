"""Transfer: masks found on a source task (phase 'source', mask finding only), then fine-tuned
with their method and seed on each target task (phase 'target', ``mask_file``). A grid.
"""
import sys

from search_spaces import transfer
from sweeps.sweep import run_sweep


def plan(sweep):
    base = transfer.base(sweep.preset)
    space = transfer.source_space(sweep.preset)
    if getattr(sweep.args, "sources", None):  # e.g. imagenet: the paper's largest setting
        space = {**space, "dataset": list(sweep.args.sources)}
    source = sweep.run_phase("source", {**base, "tune_epochs": 0}, space)
    if sweep.dry_run:  # the masks do not exist yet: check the targets' datasets and settings
        sweep.run_phase("target", base, {"dataset": transfer.target_datasets(sweep.preset)},
                        seed_axis=False)
        return
    masks = {}
    for r in source.records:
        if r["final"] is not None:  # finished source trials only; failures show in the table
            cfg = r["config"]
            label = f"{cfg['dataset']}/{cfg['method']}/seed{cfg['seed']}"
            masks[label] = {"mask_file": f"{r['checkpoint']}/masks.pt", "method": cfg["method"],
                            "seed": cfg["seed"]}
    if not masks:
        raise SystemExit("transfer: no source trial finished, nothing to transfer")
    sweep.run_phase("target", base, {"mask": dict(sorted(masks.items())),
                                     "dataset": transfer.target_datasets(sweep.preset)},
                    seed_axis=False)


def flags(parser):
    parser.add_argument("--sources", nargs="+", default=None, metavar="DATASET",
                        help="datasets the masks are found on (default: the preset's, CIFAR-100 "
                             "for paper); e.g. imagenet with --set model=resnet50")
    return ["sources"]


def main(argv=None):
    return run_sweep("transfer", plan, argv, doc=__doc__, search="grid", scheduler="fifo", flags=flags)


if __name__ == "__main__":
    sys.exit(main())
