"""A phase searched for the accuracy × cost Pareto front: Optuna's multi-objective TPE through
Ray Tune's ``OptunaSearch``, budgets as Optuna constraints, and the Pareto ranks of the finished
trials (trials.parquet columns, MLflow tags, the printed table).

Why TPE and not NSGA-II: a CPU sweep affords tens of trials. NSGA-II evolves populations
(50 by default) over generations, so at 30 trials it has not finished sampling its first,
random, generation; multi-objective TPE (Ozaki et al. 2020/2022) models the non-dominated
trials after a few random ones and proposes from that model, which is what helps at this
budget. It handles the conditional space (a pad only where there is a prompt) and, with the
constant liar (on by default), does not propose a second trial on top of a running one.

How a budget reaches the sampler: when a trial ends, :class:`ConstrainedOptunaSearch` calls the
Optuna trial's ``set_constraint(cost, (value - cap) / cap)`` for every capped cost, from the
trial's final report, *before* ``study.tell``; Optuna 5's samplers read ``trial.constraints``
(<= 0 fits) and TPE ranks the infeasible trials below the feasible ones by their total
violation, so the search concentrates where models fit.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces.pareto import ParetoSpace
from sweeps.errors import UsageError
from sweeps.preflight import check_multiobjective
from sweeps.results import Phase
from sweeps.schedulers import PhaseSearch, trial_dirname
from sweeps.tracking import failure_reason
from vpns_core.methods import METHODS
from vpns_core.pareto import ACCURACY, COSTS, DEFAULT_OBJECTIVES, Budget, pareto_ranks

if TYPE_CHECKING:
    from sweeps.sweep import Sweep


# --- flags -------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> list[str]:
    """``--objectives`` and ``--budget``; returns their destinations (they define the sweep)."""
    costs = ", ".join(f"{c.name} ({c.label})" for c in COSTS.values())
    parser.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES), metavar="COST[,COST]",
                        help=f"one or two costs to minimise beside the validation accuracy (always "
                             f"maximised); from {costs} (default: {','.join(DEFAULT_OBJECTIVES)})")
    parser.add_argument("--budget", action="append", default=[], metavar="COST=MAX",
                        help="cap a cost, e.g. latency_ms=120 or params_m=1.5 (repeatable, or "
                             "comma-separated): Optuna constraints; trials over it are marked infeasible")
    parser.epilog = ("By default: Optuna's multi-objective TPE over the method, its sparsity and the "
                     "pad (learning rates fixed at the preset's), every trial run to its end (FIFO).")
    return ["objectives", "budget"]


def parse_flags(args: argparse.Namespace) -> tuple[tuple[str, ...], Budget]:
    """The costs and budget of ``--objectives`` / ``--budget``, checked before anything runs
    (:func:`sweeps.preflight.check_multiobjective`)."""
    return check_multiobjective(args)


# --- the searcher ------------------------------------------------------------------------------


class ConstrainedOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch`` over a define-by-run :class:`ParetoSpace`, told each trial's
    objectives from its final report.

    - Optuna's parameters become Config values (:meth:`ParetoSpace.config`);
    - when a trial ends, its budget violations go to Optuna as constraints
      (``Trial.set_constraint``) before ``study.tell``;
    - a trial that ended without every objective (failed, or stopped before its final report)
      is told as failed: Optuna refuses a missing value, and the trial would stay "running";
    - the objectives are not announced to Tune as the searcher's ``metric``: Tune checks every
      report for that metric, and the objectives (accuracy of the selected epoch, the cost
      record) exist only in a trial's final report. Multi-objective Optuna takes no
      intermediate values anyway.
    """

    def __init__(self, space: ParetoSpace, costs: tuple[str, ...], budget: Budget, *,
                 sampler: optuna.samplers.BaseSampler) -> None:
        self.objectives = [ACCURACY, *costs]
        super().__init__(space=space.define, metric=self.objectives,
                         mode=["max"] + ["min"] * len(costs), sampler=sampler)
        self.pareto_space = space
        self.budget = budget

    @property
    def metric(self) -> None:
        return None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        return self.pareto_space.config(params) if isinstance(params, dict) else params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        values = [(result or {}).get(name) for name in self.objectives]
        if error or any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        else:
            for name, violation in self.budget.violations(result).items():
                ot_trial.set_constraint(name, violation)
            self._ot_study.tell(ot_trial, [float(v) for v in values])
        self._completed_trials.add(trial_id)


def sampler(seed: int, num_samples: int) -> optuna.samplers.TPESampler:
    """Multi-objective TPE, seeded; a third of the trials (4 to 10) sampled at random first."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, min(10, num_samples // 3)),
                                      constant_liar=True)


@dataclass
class MultiObjective(PhaseSearch):
    """The Pareto search of one phase (``Sweep.run_phase(..., search=MultiObjective(...))``)."""

    space: ParetoSpace
    costs: tuple[str, ...]
    budget: Budget
    default_samples: int
    name: str = "optuna-multiobjective-tpe"

    @property
    def label_keys(self) -> tuple[str, ...]:
        return self.space.label_keys

    def configs(self) -> list[dict[str, Any]]:
        return self.space.corners()

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        searched = {"sparsity", "method", "pad_size"} | {k for v in self.space.methods.values() for k in v}
        clash = sorted(searched & set(overrides))
        if clash:
            raise UsageError(f"--set {clash[0]}: the Pareto search sets {clash[0]} itself "
                             f"({', '.join(sorted(searched))}); drop --set {clash[0]}")
        timed = sorted({"latency_ms", "latency_cpu_ms"} & {*self.costs, *dict(self.budget.limits)})
        if timed and overrides.get("measure_repeats") == 0:
            raise UsageError(f"--set measure_repeats=0: {timed[0]} is an objective or capped, so "
                             f"every trial must time its model; use at least 1")

    def tune_config(self, args: argparse.Namespace, *, default_samples: int,
                    max_concurrent: int | None = None, reuse_actors: bool = True) -> tune.TuneConfig:
        num_samples = args.num_samples or self.default_samples
        search = ConstrainedOptunaSearch(self.space, self.costs, self.budget,
                                         sampler=sampler(args.optuna_seed, num_samples))
        return tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), num_samples=num_samples,
                               max_concurrent_trials=args.max_concurrent or max_concurrent,
                               trial_dirname_creator=trial_dirname, reuse_actors=reuse_actors)


# --- ranks, the table, MLflow tags ---------------------------------------------------------------


def objectives_text(costs: tuple[str, ...]) -> str:
    """``"selected_val_acc:max,latency_ms:min"``: the tag and column that name the objectives."""
    return ",".join([f"{ACCURACY}:max"] + [f"{c}:min" for c in costs])


def rank(phase: Phase, costs: tuple[str, ...], budget: Budget, *, reference: bool = False) -> None:
    """Give every trial of ``phase`` its derived columns (``pareto_rank``, ``feasible``,
    ``pareto_objectives``, ``pareto_budget``) and the phase its table. ``reference``: a phase
    outside the search (dense fine-tuning), shown with its costs but not ranked."""
    finished = [r for r in phase.records if r["final"] is not None]
    ranks = [None] * len(finished) if reference else pareto_ranks([r["final"] for r in finished], costs, budget)
    by_id = dict(zip((r["trial_id"] for r in finished), ranks))
    for record in phase.records:
        final = record["final"]
        phase.derived[record["trial_id"]] = {
            "pareto_rank": by_id.get(record["trial_id"]),
            "feasible": budget.fits(final) if final is not None else None,
            "pareto_objectives": objectives_text(costs), "pareto_budget": budget.text,
            "pareto_reference": reference}
    phase.table = table(phase, costs, budget)
    head = "reference (not searched)" if reference else \
        f"Pareto search: maximise validation accuracy, minimise {', '.join(costs)}"
    phase.table_title = (f"phase '{phase.name}': {head}" + (f"; budget {budget.text}" if budget else "")
                         + "; test accuracy shown for the validation-selected front (rank 1) only")


def table(phase: Phase, costs: tuple[str, ...], budget: Budget) -> list[dict[str, Any]]:
    """One row per trial, the front first (rank, then the first cost), unfinished trials last."""
    def order(record: dict) -> tuple:
        derived = phase.derived[record["trial_id"]]
        final = record["final"] or {}
        rank_ = derived["pareto_rank"]
        return (record["final"] is None, rank_ if rank_ is not None else math.inf,
                final.get(costs[0], math.inf), record["trial_id"])

    rows = []
    for record in sorted(phase.records, key=order):
        derived, final, config = phase.derived[record["trial_id"]], record["final"] or {}, record["config"]
        front = derived["pareto_rank"] == 1 or derived["pareto_reference"]
        row = {"trial": record["trial_id"], "method": config.get("method"),
               "sparsity": _sparsity(config), "pad": _pad(config),
               "status": "done" if record["final"] is not None else record["status"].lower(),
               "rank": derived["pareto_rank"],
               "val_acc_%": _pct(final.get(ACCURACY)),
               "test_acc_%": _pct(final.get("selected_test_acc")) if front else None,
               "latency_ms": final.get("latency_ms"),
               "latency_spread_ms": _spread(final), "latency_cpu_ms": final.get("latency_cpu_ms"),
               "params_m": final.get("params_m"), "flops_g": final.get("flops_g")}
        if budget:
            row["fits_budget"] = {True: "yes", False: "NO", None: None}[derived["feasible"]]
        rows.append(row)
    return rows


def _method(config: dict[str, Any]):
    return METHODS.get(config["method"]) if config.get("method") in METHODS else None


def _pad(config: dict[str, Any]) -> Any:
    method = _method(config)
    return config.get("pad_size") if method is not None and method.uses_prompt else "-"


def _sparsity(config: dict[str, Any]) -> Any:
    method = _method(config)
    return config.get("sparsity") if method is not None and method.prunes else "-"


def _pct(value: Any) -> float | None:
    return 100 * float(value) if isinstance(value, (int, float)) else None


def _spread(final: dict[str, Any]) -> str | None:
    low, high = final.get("latency_ms_min"), final.get("latency_ms_max")
    return f"{low:.1f}-{high:.1f}" if isinstance(low, (int, float)) and isinstance(high, (int, float)) else None


def tag_runs(sweep: "Sweep", phases: list[Phase], costs: tuple[str, ...], budget: Budget) -> None:
    """Each trial's ``pareto_rank`` and ``feasible`` (and the objectives and budget) as tags of
    its MLflow run, and the objectives and budget on the parent run. A run the store lacks or
    refuses is left to ``--resume`` (recorded as unlogged, like a failed MLflow call in a
    phase)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient
    client = MlflowClient(sweep.args.tracking_uri)
    for phase in phases:
        for trial_id, derived in phase.derived.items():
            run_id = sweep.run_ids.get(trial_id)
            if run_id is None or trial_id in sweep.unlogged:
                continue
            tags = [RunTag(k, str(v)) for k, v in derived.items() if v is not None and v != ""]
            try:
                client.log_batch(run_id, tags=tags)
            except Exception as err:  # noqa: BLE001 - the ranks are in trials.parquet; resume tags them
                sweep.unlogged[trial_id] = failure_reason(err)
    try:
        client.log_batch(sweep.parent_run_id, tags=[
            RunTag("pareto_objectives", objectives_text(costs)),
            RunTag("pareto_budget", budget.text or "none")])
    except Exception as err:  # noqa: BLE001
        print(f"[{sweep.name}] MLflow: could not tag the parent run ({failure_reason(err)})", flush=True)
