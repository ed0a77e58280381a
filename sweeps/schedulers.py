"""How a phase picks and stops trials: ASHA that knows where a trial ends, Optuna on a finite
space (listed points in a seeded order, none twice) or TPE, and the Tune config that combines
them.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search_spaces.points import driver_config, is_domain, listed_axes, named_points, point_configs


# --- ASHA that knows where a trial ends ------------------------------------------------------


class StageASHA(ASHAScheduler):
    """ASHA over the global ``epoch`` (either stage) that never stops a trial at its last epoch:
    stopping there saves no compute and would lose the final report (selected accuracy,
    artifacts)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        last = result.get("final") or result.get("epoch", 0) >= result.get("planned_epochs", math.inf)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.STOP and last else decision


# --- Optuna on a finite space -----------------------------------------------------------------


class ShuffledGridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` for a space of listed points only (no learning-rate range):
    the points in a seeded random order, none twice. TPE samples its first 10 trials at random
    *with* replacement, and a repeated point repeats a seeded trial exactly: 4 TPE samples of the
    6-point pad space ran pads 8, 4, 4, 8. Optuna stops the study once every point has run, with
    ``Study.stop()``, which raises outside ``Study.optimize`` (Ray drives Optuna by ask/tell);
    here ``num_samples`` is capped at the space's size instead and nothing calls ``stop``."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


class PhaseSearch:
    """A phase that brings its own searcher and space (``Sweep.run_phase(..., search=...)``),
    e.g. the multi-objective search of ``sweeps/pareto.py``; it runs with FIFO."""

    #: the MLflow ``search`` tag of the phase's runs
    name = "custom"
    #: config keys the searcher sets: they name each trial (MLflow run names, table columns)
    label_keys: tuple[str, ...] = ()

    def configs(self) -> list[dict[str, Any]]:
        """Config values (partial) that together cover the space, checked before any trial."""
        raise NotImplementedError

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        """Refuse a ``--set FIELD`` that the searcher itself sets (it would be overridden)."""

    def tune_config(self, args: argparse.Namespace, *, default_samples: int,
                    max_concurrent: int | None = None, reuse_actors: bool = True) -> tune.TuneConfig:
        raise NotImplementedError


def tune_config(args: argparse.Namespace, fixed: dict[str, Any], axes: dict[str, Any], *,
                default_samples: int, sweep_name: str, max_concurrent: int | None = None,
                reuse_actors: bool = True) -> tune.TuneConfig:
    """Searcher, scheduler and trial count of a phase over ``axes`` on top of ``fixed``, from the
    sweep's flags (``default_samples``: Optuna trials when --num-samples is not given;
    ``max_concurrent``: trials at once when --max-concurrent is not given; ``reuse_actors``:
    whether a trial's process serves the next trial)."""
    search_alg = None
    num_samples = args.num_samples or 1
    if args.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        num_samples = args.num_samples or default_samples
        finite = listed_axes(axes)
        if len(finite) == len(axes):  # every axis a list of points: sample without replacement
            size = math.prod(len(v) for v in finite.values())
            if num_samples > size:
                print(f"[{sweep_name}] --num-samples {num_samples} > the {size} points of the "
                      f"space: running {size} (a point twice repeats a seeded trial exactly)",
                      flush=True)
                num_samples = size
            sampler = ShuffledGridSampler(finite, seed=args.optuna_seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=args.optuna_seed)
        search_alg = OptunaSearch(sampler=sampler)
    if args.scheduler == "asha":
        epochs = max(driver_config(c).total_epochs
                     for c in point_configs(fixed, axes, named_points(axes)))
        scheduler = StageASHA(time_attr="epoch", max_t=max(epochs, 1),
                              grace_period=args.grace_period, reduction_factor=args.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=args.metric, mode=args.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=num_samples,
                           max_concurrent_trials=args.max_concurrent or max_concurrent,
                           trial_dirname_creator=trial_dirname,
                           reuse_actors=reuse_actors)  # saves starting a process + torch per trial


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def tune_axis(values: Any, search: str) -> Any:
    """A listed axis as a Tune grid (``--search grid``) or choice (Optuna); a domain as it is."""
    if is_domain(values):
        return values
    labels = list(values)  # a list of field values, or the labels of named points
    return tune.grid_search(labels) if search == "grid" else tune.choice(labels)
