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

Latency measured beside other training trials is noise (one default pad sweep read 127-221 ms for
one architecture), so once every phase has ended, :func:`retime` times each finished candidate's
exported model again, one at a time in the driver with nothing else running, under the trial's
own conditions (batch, threads, input layout); the ranks, the table, trials.parquet, MLflow and
the figure use that latency (``latency_ms``: the median, ``latency_ms_spread``: the
interquartile range of the timed runs, ``latency_ms_min`` / ``_max``), the in-trial one stays as
``latency_ms_in_trial``. The sampler was told the in-trial latency while it searched.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
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
        searched = {"sparsity", "method", "pad_size", "pattern"} | {k for v in self.space.methods.values() for k in v}
        clash = sorted(searched & set(overrides))
        if clash:
            raise UsageError(f"--set {clash[0]}: the Pareto search sets {clash[0]} itself "
                             f"({', '.join(sorted(searched))}); drop --set {clash[0]}")
        if overrides.get("cost_record") is False:
            raise UsageError("--set cost_record=false: the Pareto search ranks trials by their cost "
                             "record; drop --set cost_record")
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


# --- re-timing after training -------------------------------------------------------------------

#: timed passes of each candidate when it is re-timed (at least; more if its trial timed more)
RETIME_REPEATS = 10
#: the latency keys the re-timing replaces (:func:`vpns_core.costs.latency`)
RETIMED = ("latency_ms", "latency_ms_min", "latency_ms_max", "latency_ms_spread", "latency_cpu_ms",
           "latency_repeats", "latency_threads", "latency_device", "latency_layout", "latency_batch")


def retime(phases: list[Phase], store: Path | None = None, repeats: int = RETIME_REPEATS) -> int:
    """Time again, here and one at a time, the export (``model_export.pt`` in its checkpoint
    folder) of every finished trial of ``phases`` that timed its model, rebuilt as a user loads
    it, at the trial's batch size, thread count and input layout
    (:func:`vpns_core.pick.remeasure`). The trial's final record takes the new latency keys
    (:data:`RETIMED`); the in-trial median stays as ``latency_ms_in_trial``. A trial whose export
    is missing, or that timed on a GPU this driver lacks, keeps its in-trial latency
    (``latency_retimed`` False). ``store`` (a JSON file)
    keeps the new values by trial id, so that ``--resume`` reuses them and ranks as before.
    Returns how many trials were timed now."""
    import json

    import torch

    from vpns_core.checkpoint import atomic_write
    from vpns_core.pick import remeasure
    saved = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    done = 0
    for phase in phases:
        for record in phase.records:
            final, trial_id = record["final"], record["trial_id"]
            if final is None or not isinstance(final.get("latency_ms"), (int, float)):
                continue
            path = Path(record["checkpoint"] or "") / "model_export.pt"
            if trial_id not in saved:
                gpu_gone = str(final.get("latency_device", "")).startswith("cuda") and not torch.cuda.is_available()
                if not record["checkpoint"] or not path.is_file() or gpu_gone:  # not here: keep the trial's
                    final["latency_retimed"] = False
                    continue
                again = remeasure(path, final, max(repeats, int(final.get("latency_repeats") or 0)))
                saved[trial_id] = {k: again[k] for k in RETIMED if k in again}
                done += 1
            final.setdefault("latency_ms_in_trial", final["latency_ms"])
            final.pop("latency_cpu_ms", None)  # a different thread count leaves none
            final.update(saved[trial_id])
            final["latency_retimed"] = True
    if store is not None and done:
        text = json.dumps(saved, indent=1)
        atomic_write(store, lambda handle: handle.write(text.encode()))
    return done


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
               "pattern": _pattern(config), "sparsity": _sparsity(config), "pad": _pad(config),
               "status": "done" if record["final"] is not None else record["status"].lower(),
               "rank": derived["pareto_rank"],
               "val_acc_%": _pct(final.get(ACCURACY)),
               "test_acc_%": _pct(final.get("selected_test_acc")) if front else None,
               "latency_ms": final.get("latency_ms"), "latency_ms_spread": final.get("latency_ms_spread"),
               "latency_range_ms": _spread(final), "latency_cpu_ms": final.get("latency_cpu_ms"),
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


def _pattern(config: dict[str, Any]) -> Any:
    """"2:4" (an N:M pattern), "unstructured" (other weight masks), "channels" or "-" (dense)."""
    method = _method(config)
    if method is None or not method.prunes:
        return "-"
    return "channels" if method.structured else config.get("pattern") or "unstructured"


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
    its MLflow run, its re-timed latency (:func:`retime`) as its metrics (logged at its final
    step after the in-trial ones, so they are the run's latest), and the objectives and budget
    on the parent run. A run the store lacks or refuses is left to ``--resume`` (recorded as
    unlogged, like a failed MLflow call in a phase)."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    client = MlflowClient(sweep.args.tracking_uri)
    for phase in phases:
        finals = {r["trial_id"]: r["final"] or {} for r in phase.records}
        for trial_id, derived in phase.derived.items():
            run_id = sweep.run_ids.get(trial_id)
            if run_id is None or trial_id in sweep.unlogged:
                continue
            tags = [RunTag(k, str(v)) for k, v in derived.items() if v is not None and v != ""]
            final = finals.get(trial_id, {})
            metrics = []
            if final.get("latency_retimed"):
                stamp, step = int(time.time() * 1000), int(final.get("epoch", 0))
                metrics = [Metric(k, float(final[k]), stamp, step) for k in (*RETIMED, "latency_ms_in_trial")
                           if isinstance(final.get(k), (int, float))]
                tags += [RunTag(k, str(final[k])) for k in ("latency_device", "latency_layout") if final.get(k)]
            try:
                client.log_batch(run_id, metrics=metrics, tags=tags)
            except Exception as err:  # noqa: BLE001 - the ranks are in trials.parquet; resume tags them
                sweep.unlogged[trial_id] = failure_reason(err)
    try:
        client.log_batch(sweep.parent_run_id, tags=[
            RunTag("pareto_objectives", objectives_text(costs)),
            RunTag("pareto_budget", budget.text or "none")])
    except Exception as err:  # noqa: BLE001
        print(f"[{sweep.name}] MLflow: could not tag the parent run ({failure_reason(err)})", flush=True)
