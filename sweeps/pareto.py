"""Prune to a budget: a multi-objective search for the accuracy × cost Pareto front.

Optuna's multi-objective TPE (seeded) searches the method (structured VPNs, DepGraph, Network
Slimming, which remove channels; VPNs and HYDRA, which mask weights), its sparsity (a range per
kind; for the weight methods unstructured or 2:4 masks) and the pad size, maximising validation
accuracy and minimising the costs of ``--objectives`` (``latency_ms``: measured in the trial at
``latency_batch``, and once training is over timed again alone in the driver; ``params_m``:
parameters, nonzeros for weight masks; ``flops_g``). ``--budget latency_ms=120`` adds Optuna
constraints so that the search concentrates on models that fit. A dense fine-tuning trial is the
reference point. Every trial gets its ``pareto_rank`` (1 = the front of the trials that fit) in
trials.parquet and as an MLflow tag; ``python -m analysis pareto`` draws the front and
``python -m vpns_core.pick --sweep NAME --budget latency_ms=120 --out model.pt`` hands back the
most accurate model that fits.
"""
import sys

from search_spaces import pareto
from sweeps import multiobjective
from sweeps.sweep import run_sweep


def plan(sweep):
    costs, budget = multiobjective.parse_flags(sweep.args)
    base = pareto.base(sweep.preset)
    search = multiobjective.MultiObjective(pareto.space(sweep.preset), costs, budget,
                                           default_samples=pareto.samples(sweep.preset))
    front = sweep.run_phase("search", base, {}, search=search)
    dense = sweep.run_phase("dense", base, {**pareto.dense_reference(sweep.preset), "seed": sweep.seeds[:1]},
                            seed_axis=False, search="grid")
    if sweep.dry_run:
        return
    multiobjective.retime([front, dense], sweep.dir / "latency_retimed.json")  # training over: time each alone
    multiobjective.rank(front, costs, budget)
    multiobjective.rank(dense, costs, budget, reference=True)
    multiobjective.tag_runs(sweep, [front, dense], costs, budget)


def main(argv=None):
    return run_sweep("pareto", plan, argv, doc=__doc__, search="optuna", scheduler="fifo",
                     num_samples=pareto.samples("default"), flags=multiobjective.add_flags)


if __name__ == "__main__":
    sys.exit(main())
