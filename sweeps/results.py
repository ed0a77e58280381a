"""The records of a sweep's phases: one per trial read back from Tune's experiment folder, their
Parquet export (``trials.parquet``, ``epochs.parquet``) and the printed result table (mean ± std
of the selected test accuracies per point, seeds pooled).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.points import resolve
from sweeps.flags import METRIC
from sweeps.placement import PLACEMENT
from sweeps.text_table import print_table
from sweeps.tracking import FINAL_PREFIXES, TUNE_KEYS, error_text
from vpns_core.checkpoint import atomic_write
from vpns_core.stats import mean_std, pick

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

TABLE_METRICS = ("selected_test_acc", "selected_test_acc_prompt", "selected_test_acc_noprompt",
                 "mask_stage_test_acc_prompt",
                 "mask_stage_test_acc_noprompt", "trial_time_s")


@dataclass
class Phase:
    """The records of one finished (or interrupted) phase."""

    name: str
    axes: dict[str, list]  # discrete axis -> its values (labels) in the space's order
    records: list[dict[str, Any]]
    complete: bool
    checked_only: bool = False  # a dry run's phase: validated, never run
    #: per trial id, columns computed once the phase ended (e.g. its Pareto rank): trials.parquet
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the phase's own result table (rows, in order), replacing the per-point mean ± std one
    table: list[dict[str, Any]] | None = None
    table_title: str = ""


def collect(path: Path, phase: str, points: dict[str, dict]) -> list[dict[str, Any]]:
    """One record per trial of the experiment at ``path``: config, status, error, epochs."""
    from ray.tune import ExperimentAnalysis
    analysis = ExperimentAnalysis(str(path))
    records = []
    for trial in analysis.trials:
        results = _read_results(Path(trial.path) / "result.json")
        epochs: dict[int, dict] = {}
        final = None
        for r in results:
            if r.get("final"):
                final = r
            elif "epoch" in r:
                epochs[int(r["epoch"])] = r  # a resumed trial may repeat an epoch: keep the last
        for r in _checkpoint_epochs(trial.checkpoint):  # rows Tune's file lost to a killed driver
            epochs.setdefault(int(r["epoch"]), {**r, "trial_id": trial.trial_id})
        error = error_text(trial) if trial.status == "ERROR" else None
        records.append({
            "phase": phase, "trial_id": trial.trial_id, "status": trial.status,
            "labels": {k: trial.config[k] for k in trial.config if k in points or k in ("seed",)},
            "tune_config": dict(trial.config), "config": resolve(trial.config, points),
            "final": final, "epochs": [epochs[e] for e in sorted(epochs)], "error": error,
            "num_failures": trial.num_failures,
            "checkpoint": trial.checkpoint.path if trial.checkpoint is not None else None,
        })
    return records


def _checkpoint_epochs(checkpoint) -> list[dict[str, Any]]:
    """The epoch rows the trial carried in its last checkpoint (``sweeps.attempt.EPOCHS``)."""
    from sweeps.attempt import EPOCHS
    if checkpoint is None:
        return []
    return [r for r in _read_results(Path(checkpoint.path) / EPOCHS) if "epoch" in r]


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def export_parquet(sweep: Sweep, run_ids: dict[str, str]) -> tuple[Path, Path]:
    """trials.parquet (one row per trial) and epochs.parquet (one row per trial and epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    trial_rows, epoch_rows = [], []
    for phase in sweep.phases:
        for r in phase.records:
            last = r["epochs"][-1] if r["epochs"] else {}
            row = {"sweep": sweep.name, "script": sweep.script, "preset": sweep.preset,
                   "phase": r["phase"], "trial_id": r["trial_id"], "status": r["status"],
                   "finished": r["final"] is not None,
                   "early_stopped": r["status"] == "TERMINATED" and r["final"] is None,
                   "error": r["error"], "num_failures": r["num_failures"],
                   "mlflow_run_id": run_ids.get(r["trial_id"]), "epochs_done": last.get("epoch"),
                   "wall_time_s": last.get("wall_time_s"),
                   "checkpoint": _relative(r["checkpoint"], sweep.dir)}
            # where it ran: the node it finished on (or stopped on) and every attempt's node
            ended = r["final"] or last
            row.update({k: ended.get(k) for k in PLACEMENT})
            row.update({f"axis.{k}": str(v) for k, v in r["tune_config"].items()
                        if k in phase.axes})
            row.update({f"config.{k}": _cell(v) for k, v in r["config"].items()})
            for key, value in (r["final"] or {}).items():
                if key.startswith(FINAL_PREFIXES):
                    row[key] = value
            row.update(phase.derived.get(r["trial_id"], {}))
            for key, value in last.items():
                if key not in TUNE_KEYS and key not in row and not isinstance(value, (dict, list)):
                    row[f"last.{key}"] = value
            trial_rows.append(row)
            for e in r["epochs"]:
                epoch_rows.append({"sweep": sweep.name, "phase": r["phase"], "trial_id": r["trial_id"],
                                   **{k: v for k, v in e.items()
                                      if k not in TUNE_KEYS and not isinstance(v, (dict, list))}})
    out = (sweep.dir / "trials.parquet", sweep.dir / "epochs.parquet")
    for rows, path in zip((trial_rows, epoch_rows), out):
        keys = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows])
        atomic_write(path, lambda handle, table=table: pq.write_table(table, handle))
    return out


def _relative(path: str | None, folder: Path) -> str | None:
    """A trial's checkpoint folder relative to the sweep's folder (the sweep can move), or as
    Tune gave it when it lies elsewhere (e.g. cloud storage)."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def result_table(phase: Phase) -> list[dict[str, Any]]:
    """Per point of the phase's discrete axes (seeds pooled): trials done / stopped / failed and
    mean ± std of the selected (validation-chosen) test accuracies; or the phase's own table."""
    if phase.table is not None:
        return [{"phase": phase.name, **row} for row in phase.table]
    keys = [k for k in phase.axes if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in phase.records:
        groups.setdefault(tuple(r["tune_config"].get(k) for k in keys), []).append(r)
    def position(point: tuple) -> tuple:  # the space's order, not the order trials ran in
        return tuple(phase.axes[k].index(v) if v in phase.axes[k] else len(phase.axes[k])
                     for k, v in zip(keys, point))

    rows = []
    for point, records in sorted(groups.items(), key=lambda item: position(item[0])):
        done = [r["final"] for r in records if r["final"] is not None]
        row = {"phase": phase.name, **dict(zip(keys, point)), "done": len(done),
               "stopped": sum(r["status"] == "TERMINATED" and r["final"] is None for r in records),
               "failed": sum(r["status"] == "ERROR" for r in records)}
        for metric in TABLE_METRICS:
            values = [d[metric] for d in done if isinstance(d.get(metric), (int, float))]
            if values:  # std NaN for one value: one seed does not measure seed noise
                row[metric], row[metric + "_std"], _ = mean_std(values)
        rows.append(row)
    return rows


def best_record(phase: Phase) -> dict[str, Any] | None:
    """The finished trial with the highest selected validation accuracy (never the test set),
    ties broken as the analysis breaks them (:func:`vpns_core.stats.selection_key`)."""
    return pick([r for r in phase.records if r["final"] is not None],
                lambda r: r["final"].get("selected_val_acc", r["final"].get(METRIC)),
                lambda r: r["final"].get("selected_epoch"), lambda r: r["trial_id"])


def _cell_text(row: dict[str, Any], metric: str, unit: str = "seed") -> str:
    """``mean ± std``; one value (one ``unit``: a seed of a grid, a trial of a search) has no
    spread: ``mean (1 seed)``, never ``± nan``."""
    if metric not in row:
        return "-"
    std = row[metric + "_std"]
    return f"{row[metric]:.3f} (1 {unit})" if math.isnan(std) else f"{row[metric]:.3f} ± {std:.3f}"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_results(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Per phase: the table of ``rows`` (from :func:`result_table`), the best trial by
    validation and the failed trials with the last line of their error."""
    for phase in sweep.phases:
        body = [r for r in rows if r["phase"] == phase.name]
        if phase.table is not None:
            columns = [k for k in dict.fromkeys(k for r in body for k in r) if k != "phase"]
            print_table(phase.table_title or f"{sweep.script} [{sweep.preset}] phase '{phase.name}'",
                        columns, [[_text(r.get(k)) for k in columns] for r in body])
            continue
        keys = [k for k in phase.axes if k != "seed"]
        metrics = [m for m in TABLE_METRICS if any(m in r for r in body)]
        unit = "seed" if sweep.args.search == "grid" else "trial"
        lines = [[str(r.get(k)) for k in keys + ["done", "stopped", "failed"]]
                 + [_cell_text(r, m, unit) for m in metrics]
                 for r in body]
        pooled = "seeds" if sweep.args.search == "grid" else "the point's trials (sampled learning rates pooled)"
        print_table(f"{sweep.script} [{sweep.preset}] phase '{phase.name}' ({len(phase.records)} trials; "
                    f"accuracies: test set at the epoch chosen on validation, mean ± std over {pooled})",
                    keys + ["done", "stopped", "failed"] + metrics, lines)
        best = best_record(phase)
        if best is not None:
            cfg = {k: best["tune_config"][k] for k in best["tune_config"]
                   if k in phase.axes or k in ("mask_lr", "tune_lr")}
            print(f"best (by validation): {cfg}  selected_test_acc="
                  f"{best['final'].get('selected_test_acc', float('nan')):.4f}")
        for r in phase.records:
            if r["status"] == "ERROR":
                print(f"FAILED {r['trial_id']} {r['labels']}: {(r['error'] or '').strip().splitlines()[-1:]}")
