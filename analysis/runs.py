"""The runs of one sweep as a table, read from the Parquet export or from MLflow, and aggregated
over seeds.

Both readers give the same :class:`Runs`: ``trials`` with one row per trial and the columns of
``sweeps/results.py:export_parquet`` (``status``, ``finished``, ``early_stopped``, ``config.<field>``,
``axis.<name>``, ``selected_*``, ``mask_stage_*``, ``last.<metric>``, ...), and ``epochs`` with one
row per trial and epoch. Config fields a trial did not set explicitly get ``Config``'s default, so
a figure can always group by ``config.<field>``.

:func:`aggregate` turns trials into the plotted numbers: one row per point, mean ± std over seeds
of each metric, and how many seeds finished, failed, were stopped early or are missing.
"""
from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vpns_core.config import Config
from vpns_core.stats import mean_std, pick

PROJECT = Path(__file__).resolve().parents[1]
#: metrics of a trial's final report that the export keeps as plain columns
FINAL_PREFIXES = ("selected_", "mask_stage_", "prompt_tunable", "final_epoch", "params_m", "flops_",
                  "latency_")
#: run tags read back as trial columns: the Pareto search's ranks (``sweeps/pareto.py``) and where
#: a latency was measured
TAG_COLUMNS = ("pareto_rank", "feasible", "pareto_reference", "pareto_objectives", "pareto_budget",
               "latency_device", "latency_layout")
SELECT = "selected_val_acc"  # never the test set: per point and seed, keep the best on validation


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the sweeps' default: ``sqlite:///<results>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    results = Path(os.environ.get("VPNS_RESULTS", PROJECT / "results")).resolve()
    return f"sqlite:///{results / 'mlflow.db'}"


@dataclass
class Runs:
    """The trials (and epochs) of one sweep; ``tracking_uri`` finds their MLflow runs."""

    trials: pd.DataFrame
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)
    tracking_uri: str | None = None
    origin: str = ""

    def value(self, column: str) -> str:
        """The one value of ``column`` (e.g. ``script``), or the distinct values joined."""
        if column not in self.trials:
            return "?"
        values = list(dict.fromkeys(self.trials[column].dropna().tolist()))
        return ", ".join(map(str, values)) if values else "?"

    @property
    def sweep(self) -> str:
        return self.value("sweep")

    @property
    def script(self) -> str:
        return self.value("script")

    @property
    def preset(self) -> str:
        return self.value("preset")

    def varies(self, column: str) -> bool:
        return column in self.trials and self.trials[column].nunique(dropna=True) > 1


# --- readers -------------------------------------------------------------------------------------


def read_parquet(trials_path: str | Path, epochs_path: str | Path | None = None,
                 tracking_uri: str | None = None) -> Runs:
    """The Parquet export of a sweep (``trials.parquet``; ``epochs.parquet`` beside it by default)."""
    import pyarrow.parquet as pq

    trials_path = Path(trials_path)
    trials = pq.read_table(trials_path).to_pandas()
    epochs_path = Path(epochs_path) if epochs_path else trials_path.with_name("epochs.parquet")
    epochs = pq.read_table(epochs_path).to_pandas() if epochs_path.is_file() else pd.DataFrame()
    return Runs(complete_config(trials), epochs, tracking_uri, f"parquet {trials_path}")


def read_mlflow(experiment: str, sweep: str | None = None, tracking_uri: str | None = None,
                epoch_metrics: tuple[str, ...] = ()) -> Runs:
    """The trial runs of one sweep in an MLflow experiment (the sweep's script name).

    ``sweep`` names the sweep (its runs' ``sweep`` tag); default: the sweep of the experiment's
    most recent parent run. ``epoch_metrics`` are read back per epoch into ``epochs`` (one
    request per run and metric, so only those asked for).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise LookupError(f"no MLflow database at {uri} (give --tracking-uri)")  # don't create one
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments())
        raise LookupError(f"experiment '{experiment}' not found in {uri}; experiments: {names or 'none'}")
    ids = [found.experiment_id]
    if sweep is None:
        parents = client.search_runs(ids, "tags.role = 'parent'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if not parents:
            raise LookupError(f"experiment '{experiment}' has no sweep (no run tagged role=parent)")
        sweep = parents[0].data.tags["sweep"]
    runs = search_all(client, ids, f"tags.sweep = '{sweep}' and tags.role = 'trial'")
    if not runs:
        raise LookupError(f"sweep '{sweep}' has no trial runs in experiment '{experiment}'")
    runs.sort(key=lambda r: (r.data.tags.get("phase", ""), r.data.tags.get("trial_id", "")))
    trials = pd.DataFrame([_trial_row(run) for run in runs])
    epochs = []
    for run in runs:
        by_step: dict[int, dict[str, Any]] = {}
        for metric in epoch_metrics:
            for m in client.get_metric_history(run.info.run_id, metric):
                by_step.setdefault(m.step, {})[metric] = m.value
        tags = run.data.tags
        epochs += [{"sweep": tags.get("sweep"), "phase": tags.get("phase"),
                    "trial_id": tags.get("trial_id"), "epoch": step, **values}
                   for step, values in sorted(by_step.items())]
    return Runs(complete_config(trials), pd.DataFrame(epochs), uri,
                f"mlflow {uri} experiment {experiment} sweep {sweep}")


def search_all(client, ids: list[str], filter_string: str) -> list:
    """Every run of experiments ``ids`` matching ``filter_string``, all pages of the search."""
    runs, token = [], None
    while True:
        page = client.search_runs(ids, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _trial_row(run) -> dict[str, Any]:
    """An MLflow trial run -> a row shaped like ``trials.parquet``."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    status = {"FAILED": "ERROR", "FINISHED": "TERMINATED"}.get(run.info.status, run.info.status)
    finished = "final_epoch" in metrics or SELECT in metrics
    row = {"sweep": tags.get("sweep"), "script": tags.get("script"), "preset": tags.get("preset"),
           "phase": tags.get("phase"), "trial_id": tags.get("trial_id"), "status": status,
           "finished": finished,
           "early_stopped": status == "TERMINATED" and not finished,
           "error": tags.get("error"), "num_failures": int(tags.get("failures", 0)),
           "mlflow_run_id": run.info.run_id, "epochs_done": metrics.get("epoch"),
           "wall_time_s": metrics.get("wall_time_s")}
    for key, text in params.items():
        if key in _FIELDS:
            row[f"config.{key}"] = text if key == "tags" else _literal(text)  # tags: JSON as exported
        else:
            row[f"axis.{key}"] = text
    for key, value in metrics.items():
        row[key if key.startswith(FINAL_PREFIXES) else f"last.{key}"] = value
    for key in TAG_COLUMNS:
        if key in tags:
            row[key] = _literal(tags[key]) if key in ("pareto_rank", "feasible", "pareto_reference") else tags[key]
    return row


def _literal(text: str) -> Any:
    if text in ("None", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def complete_config(trials: pd.DataFrame) -> pd.DataFrame:
    """Fill ``config.<field>`` with ``Config``'s default where a trial left it unset.

    The export holds the config values a trial was given, so a field at its default is absent
    (or null in the rows that did not set it). Only fields that cannot be None are filled, so
    an explicit None (e.g. ``train_subset=None``) is never replaced.
    """
    trials = trials.copy()
    for name, spec in _FIELDS.items():
        if name == "tags" or "None" in str(spec.type):
            if f"config.{name}" not in trials:
                trials[f"config.{name}"] = None
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else None
        column = f"config.{name}"
        if column not in trials:
            trials[column] = default
        elif trials[column].isna().any():
            trials[column] = trials[column].astype(object).where(trials[column].notna(), default)
    return trials


# --- aggregation ---------------------------------------------------------------------------------

#: what happened to one (point, seed) cell, in the order a cell is classified
CELL_STATES = ("ok", "failed", "stopped", "missing")


def cell_state(trials: pd.DataFrame) -> pd.Series:
    """Per trial: ``ok`` (finished), ``failed`` (status ERROR), ``stopped`` (early-stopped by the
    scheduler) or ``missing`` (never ended, e.g. an interrupted sweep)."""
    def state(row) -> str:
        if bool(row.get("finished")):
            return "ok"
        if row.get("status") == "ERROR":
            return "failed"
        if bool(row.get("early_stopped")):
            return "stopped"
        return "missing"
    return trials.apply(state, axis=1) if len(trials) else pd.Series([], dtype=object)


def aggregate(trials: pd.DataFrame, by: list[str], metrics: dict[str, tuple[str, float]], *,
              seeds: list | None = None, select: str = SELECT) -> pd.DataFrame:
    """Mean ± std over seeds of each metric, per point of ``by``.

    ``metrics`` maps an output name to ``(column, factor)`` (e.g. ``"test_prompt_pct":
    ("selected_test_acc_prompt", 100)``); the result has ``<name>_mean``, ``<name>_std`` (sample
    std, NaN below two seeds), ``<name>_n`` and ``<name>_by_seed`` (``{seed: value}``: what a
    paired comparison reads, :func:`vpns_core.stats.paired`). Per point and seed, the finished trial with the
    best ``select`` (validation) accuracy counts, ties broken by :func:`vpns_core.stats.selection_key`
    (one trial per cell under a grid; an Optuna search over learning rates may leave several).
    Every point is expected at every seed of
    ``seeds`` (default: all seeds in ``trials``); columns ``ok``/``failed``/``stopped``/``missing``
    count the seeds in each state, ``seeds`` the expected count, ``trials`` the rows and
    ``failed_trials`` the failed ones among them (a failed trial at a seed that also finished
    counts there, not in ``failed``).
    """
    trials = trials.copy()
    trials["_state"] = cell_state(trials)
    if seeds is None:
        seeds = sorted(trials["config.seed"].dropna().unique().tolist())
    rows = []
    if trials.empty:
        return pd.DataFrame(columns=[*by, "seeds", "trials", *CELL_STATES, "failed_trials"])
    for point, group in trials.groupby(by, dropna=False, sort=True):
        point = point if isinstance(point, tuple) else (point,)
        counts = dict.fromkeys(CELL_STATES, 0)
        values: dict[str, dict[Any, float]] = {name: {} for name in metrics}
        for seed in seeds:
            cell = group[group["config.seed"] == seed]
            ok = cell[cell["_state"] == "ok"]
            if len(ok):
                counts["ok"] += 1
                best = pick([row for _, row in ok.iterrows()], lambda r: r.get(select),
                            lambda r: r.get("selected_epoch"), lambda r: r.get("trial_id"))
                for name, (column, factor) in metrics.items():
                    value = best.get(column)
                    if value is not None and not pd.isna(value):
                        values[name][seed] = float(value) * factor
            elif (cell["_state"] == "failed").any():
                counts["failed"] += 1
            elif (cell["_state"] == "stopped").any():
                counts["stopped"] += 1
            else:
                counts["missing"] += 1
        row = {**dict(zip(by, point)), "seeds": len(seeds), "trials": len(group), **counts,
               "failed_trials": int((group["_state"] == "failed").sum())}
        for name, vals in values.items():
            mean, std, n = mean_std(list(vals.values()))
            row.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_n": n,
                        f"{name}_by_seed": vals})
        rows.append(row)
    return pd.DataFrame(rows)
