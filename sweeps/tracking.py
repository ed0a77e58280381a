"""MLflow, written from the driver: the sweep's parent run, and one child run per trial kept by
:class:`MLflowTracker` (a Tune callback) with the trial's config, epoch metrics, final
accuracies and artifacts.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from search_spaces.points import driver_config, resolve
from sweeps.code_version import git_commit
from sweeps.trainable import FINAL, PLACEMENT
from vpns_core.config import Config

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

# Keys of a trial's report that are Tune's bookkeeping or the trainable's flags, not metrics.
TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
             "hostname", "node_ip", "date", "time_since_restore", "iterations_since_restore",
             "checkpoint_dir_name", "done", "trial_id", "experiment_tag", "should_checkpoint",
             "final", "planned_epochs"}
# Final-report keys kept as trial columns and MLflow metrics: the selected model's accuracies,
# and for channel methods the dense-vs-pruned measurements (vpns_core.channel_pruning.compare).
FINAL_PREFIXES = ("selected_", "mask_stage_", "prompt_tunable", "prompt_input_fraction",
                  "prompt_image_fraction", "trial_time_s", "dense_", "pruned_", "speedup",
                  "memory_", "flops_", "params_ratio", "train_speedup", "train_memory_ratio",
                  "removal_max_abs_diff")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in TUNE_KEYS and isinstance(v, (int, float))}


@dataclass
class _RunState:
    run_id: str
    last_epoch: int = 0
    final: bool = False
    artifacts: bool = False
    closed: bool = False  # FINISHED with its final metrics: a re-reported end leaves it alone


class MLflowTracker(tune.Callback):
    """One MLflow run per trial (child of the sweep's parent run), written from the driver.

    Runs are found again by their ``trial_id`` tag, so a resumed sweep or a retried trial keeps
    its run (no duplicates) and epochs already logged are not logged twice. Params: every Config
    value; metrics: every numeric epoch metric at ``step = epoch``, then the final selected
    accuracies; artifacts: layer stats (JSON, CSV), the prompt PNG, the model with --log-model.
    """

    def __init__(self, *, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 tags: dict[str, str], points: dict[str, dict], label_keys: list[str],
                 log_model: bool) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = tags
        self.points = points
        self.label_keys = label_keys
        self.log_model = log_model
        self._client = None
        self._runs: dict[str, _RunState] = {}

    def __getstate__(self) -> dict:  # pickled into tuner.pkl: no client, no cache
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _run(self, trial) -> _RunState:
        state = self._runs.get(trial.trial_id)
        if state is not None:
            return state
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.trial_id = '{trial.trial_id}' and tags.sweep = '{self.tags['sweep']}'")
        if found:
            run = found[0]
            final = "final_epoch" in run.data.metrics
            state = _RunState(run.info.run_id, int(run.data.metrics.get("epoch", 0)), final,
                              run.data.tags.get("artifacts") == "logged",
                              closed=final and run.info.status == "FINISHED")
            if run.info.status != "RUNNING" and not state.closed:
                self.client.update_run(state.run_id, status="RUNNING")
        else:
            state = _RunState(self._create(trial))
        self._runs[trial.trial_id] = state
        return state

    def _create(self, trial) -> str:
        from mlflow.entities import Param
        values = resolve(trial.config, self.points)
        try:  # every field, defaults included
            values = {**driver_config(values).to_dict(), "device": values.get("device", "auto")}
        except ValueError:
            pass  # an invalid point: log what was asked for; the trial fails with the reason
        label = " ".join(f"{k}={trial.config[k]}" for k in self.label_keys if k in trial.config)
        tags = {**self.tags, "mlflow.parentRunId": self.parent_run_id, "role": "trial",
                "trial_id": trial.trial_id, "trial_name": str(trial)}
        for key in ("method", "prompt", "dataset", "model", "vp_stages", "schedule"):
            tags[key] = str(values.get(key))
        try:
            tags["layout"] = Config.from_dict(values).layout
        except ValueError:
            pass
        run = self.client.create_run(self.experiment_id, run_name=label or str(trial), tags=tags)
        params = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in values.items()}
        params.update({k: str(trial.config[k]) for k in self.points if k in trial.config})
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[start:start + 100])
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric, RunTag
        state = self._run(trial)
        now = int(time.time() * 1000)
        epoch = int(result.get("epoch", 0))
        tags = [RunTag(k, str(result[k])) for k in PLACEMENT if result.get(k) not in (None, "")]
        if result.get("final"):
            if not state.final:
                values = {k: v for k, v in _numeric(result).items() if k.startswith(FINAL_PREFIXES)}
                values["final_epoch"] = epoch
                self.client.log_batch(state.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()],
                                      tags=tags)
                state.final = True
        elif epoch > state.last_epoch:
            metrics = [Metric(k, v, now, epoch) for k, v in _numeric(result).items()]
            self.client.log_batch(state.run_id, metrics=metrics, tags=tags)
            state.last_epoch = epoch

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        state = self._run(trial)
        if state.artifacts:
            return
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            if not (folder / FINAL).is_file():
                return
            for name in ("layer_stats.json", "layer_stats.csv", "prompt.png", FINAL):
                if (folder / name).is_file():
                    self.client.log_artifact(state.run_id, str(folder / name))
            if self.log_model:
                for name in ("model_export.pt", "masks.pt"):
                    self.client.log_artifact(state.run_id, str(folder / name), "model")
        self.client.set_tag(state.run_id, "artifacts", "logged")
        state.artifacts = True

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.client.set_tag(self._run(trial).run_id, "failures", str(trial.num_failures))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        state = self._run(trial)
        if state.closed:  # finished before the driver died; Tune only saw its end again
            return
        self.client.set_tag(state.run_id, "early_stopped", str(not state.final).lower())
        self.client.set_terminated(state.run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        state = self._run(trial)
        error = error_text(trial)
        self.client.set_tag(state.run_id, "error", error[-5000:])
        self.client.set_tag(state.run_id, "failures", str(trial.num_failures))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "error.txt").write_text(error)
            self.client.log_artifact(state.run_id, str(Path(tmp) / "error.txt"))
        self.client.set_terminated(state.run_id, status="FAILED")


def error_text(trial) -> str:
    """The error a failed Tune trial ended with (its traceback), or "unknown error"."""
    error = trial.get_pickled_error() or trial.get_error()
    if error is None and trial.error_file and os.path.isfile(trial.error_file):
        # Tune writes the error next to the driver first and copies it to storage later: an
        # on_trial_error callback (no retries left) may run before that copy exists.
        error = Path(trial.error_file).read_text()
    return str(error) if error is not None else "unknown error"


def open_mlflow(sweep: Sweep) -> None:
    """The experiment of this script and the sweep's parent run (found again on --resume)."""
    uri = sweep.args.tracking_uri
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        database.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates a new database's tables on first use; two sweeps starting at once on a
        # new file raced there (one crashed): the first creates them under a lock.
        with open(database.with_name(database.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _open_mlflow_runs(sweep)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    _open_mlflow_runs(sweep)


def _open_mlflow_runs(sweep: Sweep) -> None:
    from mlflow.tracking import MlflowClient
    uri = sweep.args.tracking_uri
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep.script)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):  # artifacts next to the database
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / sweep.script).as_uri()
        try:
            sweep.experiment_id = client.create_experiment(sweep.script, artifact_location=location)
        except Exception:  # noqa: BLE001 - another sweep created it meanwhile (a shared server)
            experiment = client.get_experiment_by_name(sweep.script)
            if experiment is None:
                raise
            sweep.experiment_id = experiment.experiment_id
    else:
        sweep.experiment_id = experiment.experiment_id
    found = client.search_runs([sweep.experiment_id], max_results=1,
                               filter_string=f"tags.sweep = '{sweep.name}' and tags.role = 'parent'")
    if found:
        sweep.parent_run_id = found[0].info.run_id
        client.update_run(sweep.parent_run_id, status="RUNNING")
        return
    args = sweep.args
    run = client.create_run(sweep.experiment_id, run_name=sweep.name, tags={
        "sweep": sweep.name, "role": "parent", "script": sweep.script, "preset": args.preset,
        "search": args.search, "scheduler": args.scheduler, "mlflow.source.git.commit": git_commit()})
    sweep.parent_run_id = run.info.run_id
    for key in ("preset", "search", "scheduler", "num_samples", "seeds", "set", "grace_period",
                "reduction_factor", "optuna_seed", "cpus_per_trial", "gpus_per_trial", "max_failures"):
        client.log_param(sweep.parent_run_id, key, str(getattr(args, key)))
