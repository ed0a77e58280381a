"""MLflow, written from the driver: the sweep's parent run, and one child run per trial kept by
:class:`MLflowTracker` (a Tune callback) with the trial's config, epoch metrics, final
accuracies and artifacts.

The tracking store may be a shared server that goes away mid-sweep. MLflow calls then fail in
seconds (:func:`fail_fast`), the tracker marks the trials it could not log and stops calling for
them, and training goes on: Tune's storage keeps every result. At the end of each phase
:meth:`MLflowTracker.backfill` writes whatever the store lacks from Tune's records, so a sweep
resumed with ``--resume`` once the server is back completes its runs without duplicates.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
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
from vpns_core.export import PROGRAM, UNPROMPTED_PROGRAM

if TYPE_CHECKING:
    from sweeps.sweep import Sweep

# Keys of a trial's report that are Tune's bookkeeping or the trainable's flags, not metrics.
TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
             "hostname", "node_ip", "date", "time_since_restore", "iterations_since_restore",
             "checkpoint_dir_name", "done", "trial_id", "experiment_tag", "should_checkpoint",
             "final", "planned_epochs"}
# Final-report keys kept as trial columns and MLflow metrics: the selected model's accuracies,
# every trial's cost record (vpns_core.costs.cost_record: params_m, flops_*, latency_*) and for
# channel methods the dense-vs-pruned measurements (vpns_core.channel_pruning.compare).
FINAL_PREFIXES = ("selected_", "mask_stage_", "prompt_tunable", "prompt_input_fraction",
                  "prompt_image_fraction", "trial_time_s", "dense_", "pruned_", "speedup",
                  "memory_", "flops_", "params_ratio", "params_m", "latency_", "train_speedup",
                  "train_memory_ratio", "removal_max_abs_diff")
#: text values of the final report kept as run tags (what a latency was measured on)
FINAL_TAGS = ("latency_device", "latency_layout")


#: MLflow's own HTTP defaults (7 retries with exponential back-off, 120 s timeout) make every call
#: to a dead server hang for minutes; these make it fail in about 3 s. A user's settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
#: after a failed call, the tracker leaves the store alone this long (new trials are marked
#: unlogged at once) before it tries again
RETRY_AFTER_S = 30.0
#: MLflow accepts at most 1000 metrics per log_batch call
BATCH = 1000
#: the experiment tag that makes MLflow 3's UI treat an experiment as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_link(uri: str, experiment_id: str) -> str:
    """The experiment's page in a tracking server's UI, opened on its runs ("" for a local store).
    MLflow 3.17's UI opens every experiment on its GenAI overview unless the browser chose "Model
    training" (the ``workflowType`` query, which it then remembers)."""
    if not uri.startswith(("http://", "https://")):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def fail_fast() -> None:
    """Set :data:`HTTP_DEFAULTS` in this process's environment where the user has not."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


#: words in a failed MLflow call's message -> the short reason a user reads
_UNREACHABLE = (("Connection refused", "connection refused"), ("timed out", "timed out"),
                ("Name or service not known", "unknown host"), ("Max retries exceeded", "no answer"))


def failure_reason(err: BaseException) -> str:
    """One short line for a failed MLflow call (MLflow's own message repeats the URL thrice)."""
    text = " ".join(str(err).split()) or type(err).__name__
    for words, reason in _UNREACHABLE:
        if words in text:
            return f"server unreachable: {reason}"
    return text if len(text) <= 200 else text[:197] + "..."


def _server_unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the store did not answer (rather than refusing one request)."""
    from mlflow.exceptions import RestException
    return not isinstance(err, RestException) or err.get_http_status_code() >= 500


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


def placement_tags(result: dict[str, Any]) -> list:
    """Where a trial ran (node, host, GPUs, device; see ``sweeps.trainable.PLACEMENT``) as the
    run's tags, from one of its reports."""
    from mlflow.entities import RunTag
    return [RunTag(k, str(result[k])) for k in PLACEMENT if result.get(k) not in (None, "")]


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
        #: trial id -> why its run could not be written; no further calls are made for it
        self.unlogged: dict[str, str] = {}
        self._offline_until = 0.0
        self._offline_reason = ""

    def __getstate__(self) -> dict:  # pickled into tuner.pkl: no client, no cache
        return {**self.__dict__, "_client": None, "_runs": {}, "unlogged": {},
                "_offline_until": 0.0, "_offline_reason": ""}

    def _guarded(self, trial, action, *args) -> None:
        """Run ``action(*args)`` for ``trial`` unless its run is already marked unlogged; an
        MLflow failure marks it (and, if the store did not answer, keeps every call away from the
        store for :data:`RETRY_AFTER_S`) instead of stopping the sweep."""
        if trial.trial_id in self.unlogged:
            return
        if time.monotonic() < self._offline_until:  # quietly: the failure was reported
            self.unlogged[trial.trial_id] = self._offline_reason
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            reason = failure_reason(err)
            self.unlogged[trial.trial_id] = reason
            offline = _server_unreachable(err)
            if offline:
                self._offline_until = time.monotonic() + RETRY_AFTER_S
                self._offline_reason = reason
            print(f"[{self.tags['sweep']}] MLflow: could not log trial {trial.trial_id} to "
                  f"{self.tracking_uri} ({reason}); training goes on and Tune's storage keeps its "
                  f"results; the run is completed at the end of the phase or by --resume"
                  + (f"; no MLflow calls for {RETRY_AFTER_S:.0f} s" if offline else ""),
                  file=sys.stderr, flush=True)

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

    def _values(self, trial) -> dict[str, Any]:
        values = resolve(trial.config, self.points)
        try:  # every field, defaults included
            return {**driver_config(values).to_dict(), "device": values.get("device", "auto")}
        except ValueError:
            return values  # an invalid point: log what was asked for; the trial fails with the reason

    def _create(self, trial) -> str:
        values = self._values(trial)
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
        self._log_params(run.info.run_id, trial, {})
        return run.info.run_id

    def _log_params(self, run_id: str, trial, logged: dict[str, str]) -> None:
        """Every config value (and each axis' label) as a param, except those ``logged`` already."""
        from mlflow.entities import Param
        values = self._values(trial)
        params = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in values.items()}
        params.update({k: str(trial.config[k]) for k in self.points if k in trial.config})
        items = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guarded(trial, self._run, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._guarded(trial, self._log_result, trial, result)

    def _log_result(self, trial, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        state = self._run(trial)
        now = int(time.time() * 1000)
        epoch = int(result.get("epoch", 0))
        if result.get("final"):
            if not state.final:
                self._log_final(state.run_id, result, now)
                state.final = True
        elif epoch > state.last_epoch:
            metrics = [Metric(k, v, now, epoch) for k, v in _numeric(result).items()]
            self.client.log_batch(state.run_id, metrics=metrics, tags=placement_tags(result))
            state.last_epoch = epoch

    def _log_final(self, run_id: str, result: dict[str, Any], stamp: int) -> None:
        from mlflow.entities import Metric
        epoch = int(result.get("epoch", 0))
        values = {k: v for k, v in _numeric(result).items() if k.startswith(FINAL_PREFIXES)}
        values["final_epoch"] = epoch
        from mlflow.entities import RunTag
        tags = placement_tags(result) + [RunTag(k, str(result[k])) for k in FINAL_TAGS if result.get(k)]
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, epoch) for k, v in values.items()],
                              tags=tags)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._guarded(trial, self._log_checkpoint, trial, checkpoint)

    def _log_checkpoint(self, trial, checkpoint) -> None:
        state = self._run(trial)
        if state.artifacts:
            return
        with checkpoint.as_directory() as folder:
            state.artifacts = self._log_artifacts(state.run_id, Path(folder))

    def _log_artifacts(self, run_id: str, folder: Path) -> bool:
        """The final checkpoint's files (layer stats, prompt, model with --log-model); False if
        ``folder`` is not a finished trial's checkpoint."""
        if not (folder / FINAL).is_file():
            return False
        for name in ("layer_stats.json", "layer_stats.csv", "prompt.png", FINAL):
            if (folder / name).is_file():
                self.client.log_artifact(run_id, str(folder / name))
        if self.log_model:
            for name in ("model_export.pt", "masks.pt", PROGRAM, UNPROMPTED_PROGRAM):
                if (folder / name).is_file():  # (no unprompted program without a prompt)
                    self.client.log_artifact(run_id, str(folder / name), "model")
        self.client.set_tag(run_id, "artifacts", "logged")
        return True

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._guarded(trial, lambda: self.client.set_tag(self._run(trial).run_id, "failures",
                                                         str(trial.num_failures)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._guarded(trial, self._complete, trial)

    def _complete(self, trial) -> None:
        state = self._run(trial)
        if state.closed:  # finished before the driver died; Tune only saw its end again
            return
        self._finish_run(state.run_id, early_stopped=not state.final)
        state.closed = True

    def _finish_run(self, run_id: str, early_stopped: bool) -> None:
        self.client.set_tag(run_id, "early_stopped", str(early_stopped).lower())
        self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guarded(trial, lambda: self._fail_run(self._run(trial).run_id, trial, error_text(trial)))

    def _fail_run(self, run_id: str, trial, error: str) -> None:
        self.client.set_tag(run_id, "error", error[-5000:])
        self.client.set_tag(run_id, "failures", str(trial.num_failures))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "error.txt").write_text(error)
            self.client.log_artifact(run_id, str(Path(tmp) / "error.txt"))
        self.client.set_terminated(run_id, status="FAILED")

    # --- back-fill ---------------------------------------------------------------------------

    def backfill(self, path: Path, records: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
        """Write to MLflow what it lacks of the phase at ``path`` (Tune's experiment folder),
        from Tune's ``records`` (:func:`sweeps.results.collect`): missing runs, params, epochs
        after the last one logged, the final metrics, artifacts and the end status. Each epoch
        is logged once, and one run per trial (found by ``trial_id``). Returns ``{trial_id:
        run_id}`` for the trials it saw in MLflow and ``{trial_id: reason}`` for those whose
        runs it could not write or check (the store unreachable)."""
        from ray.tune import ExperimentAnalysis
        self.unlogged = {}
        self._offline_until = 0.0
        try:
            existing = self._phase_runs()
        except Exception as err:  # noqa: BLE001 - the store is down: nothing can be checked
            reason = failure_reason(err)
            return ({tid: s.run_id for tid, s in self._runs.items()},
                    {r["trial_id"]: reason for r in records})
        trials = {t.trial_id: t for t in ExperimentAnalysis(str(path)).trials}
        run_ids: dict[str, str] = {}
        for record in records:
            tid = record["trial_id"]
            trial = trials[tid]
            run = existing.get(tid)
            if run is not None:
                run_ids[tid] = run.info.run_id
            self._guarded(trial, self._backfill_trial, trial, record, run, run_ids)
        return run_ids, dict(self.unlogged)

    def _phase_runs(self) -> dict[str, Any]:
        """This phase's trial runs by trial id (every page of the search)."""
        from analysis.runs import search_all
        query = (f"tags.sweep = '{self.tags['sweep']}' and tags.phase = '{self.tags['phase']}' "
                 f"and tags.role = 'trial'")
        return {run.data.tags.get("trial_id"): run
                for run in search_all(self.client, [self.experiment_id], query)}

    def _backfill_trial(self, trial, record: dict[str, Any], run, run_ids: dict[str, str]) -> None:
        from mlflow.entities import Metric
        if run is None:
            run_id = self._create(trial)
            run_ids[trial.trial_id] = run_id
            tags, metrics, status = {}, {}, "RUNNING"
        else:
            run_id, tags, metrics, status = (run.info.run_id, run.data.tags, run.data.metrics,
                                             run.info.status)
            self._log_params(run_id, trial, run.data.params)  # created, then the store went away
        last = int(metrics.get("epoch", 0))
        batch: list[Metric] = []
        for result in record["epochs"]:
            epoch = int(result.get("epoch", 0))
            if epoch > last:
                stamp = int(result.get("timestamp", time.time()) * 1000)
                batch += [Metric(k, v, stamp, epoch) for k, v in _numeric(result).items()]
        for start in range(0, len(batch), BATCH):
            self.client.log_batch(run_id, metrics=batch[start:start + BATCH])
        final = record["final"]
        if final is not None and "final_epoch" not in metrics:
            self._log_final(run_id, final, int(final.get("timestamp", time.time()) * 1000))
        if tags.get("artifacts") != "logged" and record.get("checkpoint"):
            from ray.tune import Checkpoint
            with Checkpoint(record["checkpoint"]).as_directory() as folder:
                self._log_artifacts(run_id, Path(folder))
        if record["status"] == "TERMINATED" and status != "FINISHED":
            self._finish_run(run_id, early_stopped=final is None)
        elif record["status"] == "ERROR" and status != "FAILED":
            self._fail_run(run_id, trial, record["error"] or "unknown error")


def error_text(trial) -> str:
    """The error a failed Tune trial ended with (its traceback), or "unknown error"."""
    error = trial.get_pickled_error() or trial.get_error()
    if error is None and trial.error_file and os.path.isfile(trial.error_file):
        # Tune writes the error next to the driver first and copies it to storage later: an
        # on_trial_error callback (no retries left) may run before that copy exists.
        error = Path(trial.error_file).read_text()
    return str(error) if error is not None else "unknown error"


def open_mlflow(sweep: Sweep) -> None:
    """The experiment of this script (tagged as model training, :data:`EXPERIMENT_KIND`) and the
    sweep's parent run (found again on --resume). Sets :func:`fail_fast` for this process."""
    fail_fast()
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
            sweep.experiment_id = client.create_experiment(sweep.script, artifact_location=location,
                                                           tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - another sweep created it meanwhile (a shared server)
            experiment = client.get_experiment_by_name(sweep.script)
            if experiment is None:
                raise
    if experiment is not None:
        sweep.experiment_id = experiment.experiment_id
        for key, value in EXPERIMENT_KIND.items():  # created by an older version or by hand
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(sweep.experiment_id, key, value)
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
