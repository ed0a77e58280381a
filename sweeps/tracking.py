"""MLflow, written from the driver: the sweep's parent run, and one child run per trial kept by
:class:`MLflowTracker` (a Tune callback) with the trial's config, epoch metrics, final
accuracies and artifacts, its dataset as an MLflow input, what its process used as ``system/``
metrics and a one-line summary as its description; and the experiment's saved view of each sweep
(:func:`save_trials_view`), which the link the sweep prints opens.

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
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from search_spaces.points import driver_config, resolve
from sweeps.attempt import FINAL
from sweeps.code_version import git_commit
from sweeps.placement import PLACEMENT
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
# the cost record where a trial measures it (cfg.cost_record; vpns_core.costs: params_m, flops_*,
# latency_*), for channel methods the dense-vs-pruned parameters and, with the cost record, the
# rest of their measurements (vpns_core.costs.compare).
FINAL_PREFIXES = ("selected_", "mask_stage_", "prompt_tunable", "prompt_input_fraction",
                  "prompt_image_fraction", "trial_time_s", "dense_", "pruned_", "speedup",
                  "memory_", "flops_", "params_ratio", "params_m", "latency_", "train_speedup",
                  "train_memory_ratio", "removal_max_abs_diff", "semi_structured_")
#: text values of the final report kept as run tags (what a latency was measured on)
FINAL_TAGS = ("latency_device", "latency_layout", "nm_dense_layers", "semi_structured_note")


#: MLflow's own HTTP defaults (7 retries with exponential back-off, 120 s timeout) make every call
#: to a dead server hang for minutes; these make it fail in about 3 s. A user's settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
#: after a failed call, the tracker leaves the store alone this long (new trials are marked
#: unlogged at once) before it tries again
RETRY_AFTER_S = 30.0
#: MLflow accepts at most 1000 metrics per log_batch call
BATCH = 1000
#: the tag that says why a run (trial or parent) was KILLED: Ctrl-C, or Ray lost under the sweep
STOPPED = "stopped"
#: the experiment tag that makes MLflow 3's UI treat an experiment as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


#: where the UI command printed for a local store (:func:`ui_command`) serves it
UI_ADDRESS = "http://127.0.0.1:5000"
#: the numbers a user compares first: the runs-table columns of a sweep's saved view, in order
#: (``sparsity`` is the realised one at the last epoch), and the run description's summary
KEY_METRICS = ("selected_test_acc", "selected_test_acc_prompt", "selected_test_acc_noprompt",
               "sparsity", "trial_time_s")
#: experiment tags ``<prefix><id>`` hold MLflow 3.17's saved views of the runs table
VIEW_PREFIX = "mlflow.sharedViewState."


def ui_command(uri: str) -> str:
    """The command that serves the UI of a local store (SQLite or a folder) at
    :data:`UI_ADDRESS` ("" for a server, which serves its own). It turns off MLflow 3's job
    runner, whose seven ``huey`` worker processes sweeps never use."""
    if uri.startswith(("http://", "https://")):
        return ""
    mlflow = Path(sys.executable).with_name("mlflow")
    try:
        mlflow = mlflow.relative_to(Path.cwd())
    except ValueError:
        pass
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow} ui --backend-store-uri {uri} "
            f"--host 127.0.0.1 --port {UI_ADDRESS.rsplit(':', 1)[1]}")


def ui_link(uri: str, experiment_id: str, view: str = "") -> str:
    """The experiment's runs in the UI: the server at ``uri``, or for a local store the one
    :func:`ui_command` starts; with ``view``, opened on that saved view (:func:`save_trials_view`).
    MLflow 3.17's UI opens every experiment on its GenAI overview unless the browser chose "Model
    training" (the ``workflowType`` query, which it then remembers)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    if view:
        return (f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}"
                f"&workflowType=machine_learning")
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def view_key(sweep: str) -> str:
    """The id of ``sweep``'s saved view (tag keys take no ``=`` or ``+``, sweep names may)."""
    return "trials-" + re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)


def trials_view_state(sweep: str) -> dict[str, Any]:
    """The runs table of ``sweep``'s trials as MLflow 3.17's UI keeps it: sorted by the selected
    test accuracy, best first (which also lists them flat rather than folded under their parent
    run), with the Dataset and :data:`KEY_METRICS` as its columns, narrow enough to fit most
    screens (the table draws only the columns in view; the UI may still sort the metric columns
    by name). Column keys are the UI's ``<type>.`<name>``` form."""
    columns = ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in KEY_METRICS)]
    return {"searchFilter": f"tags.sweep = '{sweep}' and tags.role = 'trial'",
            "orderByKey": "metrics.`selected_test_acc`", "orderByAsc": False,
            "selectedColumns": columns, "columnOrder": columns,
            "columnWidths": {columns[0]: 180, **{c: 110 for c in columns[1:]}}}


def save_trials_view(client, experiment_id: str, sweep: str) -> str:
    """Save (or refresh) the experiment's view "<sweep>: trials by accuracy"
    (:func:`trials_view_state`) and return its id for :func:`ui_link`. The tag's value is the
    envelope the UI writes when a user saves a view: name, times in ms, and the state as a JSON
    string."""
    key = view_key(sweep)
    now = int(time.time() * 1000)
    client.set_experiment_tag(experiment_id, VIEW_PREFIX + key, json.dumps(
        {"name": f"{sweep}: trials by accuracy", "createdAt": now, "updatedAt": now,
         "state": json.dumps(trials_view_state(sweep))}))
    return key


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


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """An epoch report's MLflow metrics: its numbers, and what the trial's process used
    (``result["system"]``, :mod:`sweeps.usage`) under MLflow's ``system/`` prefix, which the
    run page's "System metrics" tab shows."""
    system = result.get("system") or {}
    return {**_numeric(result), **{f"system/{k}": float(v) for k, v in system.items()
                                   if isinstance(v, (int, float))}}


def dataset_input(record: dict[str, Any]):
    """A trial's dataset (:func:`vpns_core.data.split_record`: name, split sizes, digest) as the
    MLflow input of its run, in the ``train`` context; the runs table's Dataset column shows
    ``name (digest)``, the run page its split sizes (the profile)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    sizes = {k: record[k] for k in ("train", "val", "test", "num_classes") if k in record}
    dataset = Dataset(name=record["name"], digest=record["digest"], source_type="vpns",
                      source=json.dumps({"dataset": record["name"]}),
                      profile=json.dumps({"num_rows": record.get("train"), **sizes}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def summary(final: dict[str, Any]) -> str:
    """A finished trial's key numbers (:data:`KEY_METRICS`) in one line of Markdown: its run's
    description, the first thing on the run's page."""
    data = final.get("dataset") or {}
    line = (f"**Test accuracy {_percent(final.get('selected_test_acc'))}** (epoch "
            f"{final.get('selected_epoch', '?')}, selected on validation): "
            f"{_percent(final.get('selected_test_acc_prompt'))} with the prompt, "
            f"{_percent(final.get('selected_test_acc_noprompt'))} without · sparsity "
            f"{_percent(final.get('sparsity'))}")
    if isinstance(final.get("trial_time_s"), (int, float)):
        line += f" · trial time {final['trial_time_s']:.0f} s"
    if data:
        line += (f" · {data['name']}: {data.get('train')} train / {data.get('val')} val / "
                 f"{data.get('test')} test images")
    return line


@dataclass
class _RunState:
    run_id: str
    last_epoch: int = 0
    final: bool = False
    artifacts: bool = False
    closed: bool = False  # FINISHED with its final metrics: a re-reported end leaves it alone
    dataset: bool = False  # its dataset input is logged


def placement_tags(result: dict[str, Any]) -> list:
    """Where a trial ran (node, host, GPUs, device; see ``sweeps.placement.PLACEMENT``) as the
    run's tags, from one of its reports."""
    from mlflow.entities import RunTag
    return [RunTag(k, str(result[k])) for k in PLACEMENT if result.get(k) not in (None, "")]


class MLflowTracker(tune.Callback):
    """One MLflow run per trial (child of the sweep's parent run), written from the driver.

    Runs are found again by their ``trial_id`` tag, so a resumed sweep or a retried trial keeps
    its run (no duplicates) and epochs already logged are not logged twice. Params: every Config
    value; metrics: every numeric epoch metric at ``step = epoch`` (with the process's use under
    ``system/``, :func:`epoch_metrics`), then the final selected accuracies; its dataset as an
    input (:func:`dataset_input`), once; the final numbers as its description (:func:`summary`);
    artifacts: layer stats (JSON, CSV), the prompt PNG, the model with --log-model.
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
                              closed=final and run.info.status == "FINISHED",
                              dataset=_has_dataset(run))
            if run.info.status != "RUNNING" and not state.closed:
                self.client.update_run(state.run_id, status="RUNNING")
                if STOPPED in run.data.tags:  # resumed: the reason it stopped no longer holds
                    self.client.delete_tag(state.run_id, STOPPED)
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
        if result.get("dataset") and not state.dataset:
            self.client.log_inputs(state.run_id, datasets=[dataset_input(result["dataset"])])
            state.dataset = True
        if result.get("final"):
            if not state.final:
                self._log_final(state.run_id, result, now)
                state.final = True
        elif epoch > state.last_epoch:
            metrics = [Metric(k, v, now, epoch) for k, v in epoch_metrics(result).items()]
            self.client.log_batch(state.run_id, metrics=metrics, tags=placement_tags(result))
            state.last_epoch = epoch

    def _log_final(self, run_id: str, result: dict[str, Any], stamp: int) -> None:
        from mlflow.entities import Metric
        epoch = int(result.get("epoch", 0))
        values = {k: v for k, v in _numeric(result).items() if k.startswith(FINAL_PREFIXES)}
        values["final_epoch"] = epoch
        from mlflow.entities import RunTag
        tags = placement_tags(result) + [RunTag(k, str(result[k])) for k in FINAL_TAGS if result.get(k)]
        tags.append(RunTag("mlflow.note.content", summary(result)))
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
                batch += [Metric(k, v, stamp, epoch) for k, v in epoch_metrics(result).items()]
        for start in range(0, len(batch), BATCH):
            self.client.log_batch(run_id, metrics=batch[start:start + BATCH])
        final = record["final"]
        data = next((r["dataset"] for r in [*record["epochs"], final or {}] if r.get("dataset")), None)
        if data and (run is None or not _has_dataset(run)):
            self.client.log_inputs(run_id, datasets=[dataset_input(data)])
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

    def mark_killed(self, records: list[dict[str, Any]], reason: str) -> dict[str, str]:
        """After the phase stopped early (Ctrl-C, Ray lost): every run of the phase still RUNNING
        is KILLED with ``reason`` in its :data:`STOPPED` tag (``--resume`` reopens it), except a
        trial that reported its end, which is FINISHED (Tune may not have saved its end yet;
        resumed, it only reports it again). Runs Tune never saved (started just before Ray went
        away) are found in MLflow. Returns ``{trial_id: why}`` for what MLflow refused."""
        ended = {r["trial_id"] for r in records if r["final"] is not None and r["status"] != "ERROR"}
        try:
            runs = self._phase_runs()
        except Exception as err:  # noqa: BLE001 - the results are in Tune's storage
            return {r["trial_id"]: failure_reason(err) for r in records}
        unlogged: dict[str, str] = {}
        for tid, run in runs.items():
            if run.info.status != "RUNNING":
                continue
            try:
                if tid in ended:
                    self._finish_run(run.info.run_id, early_stopped=False)
                else:
                    self.client.set_tag(run.info.run_id, STOPPED, reason)
                    self.client.set_terminated(run.info.run_id, status="KILLED")
            except Exception as err:  # noqa: BLE001
                unlogged[tid] = failure_reason(err)
        return unlogged


def _has_dataset(run) -> bool:
    inputs = getattr(run, "inputs", None)
    return bool(inputs is not None and inputs.dataset_inputs)


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
    sweep.view = save_trials_view(client, sweep.experiment_id, sweep.name)
    found = client.search_runs([sweep.experiment_id], max_results=1,
                               filter_string=f"tags.sweep = '{sweep.name}' and tags.role = 'parent'")
    if found:
        sweep.parent_run_id = found[0].info.run_id
        client.update_run(sweep.parent_run_id, status="RUNNING")
        if STOPPED in found[0].data.tags:  # resumed
            client.delete_tag(sweep.parent_run_id, STOPPED)
        return
    args = sweep.args
    run = client.create_run(sweep.experiment_id, run_name=sweep.name, tags={
        "sweep": sweep.name, "role": "parent", "script": sweep.script, "preset": args.preset,
        "search": args.search, "scheduler": args.scheduler, "mlflow.source.git.commit": git_commit()})
    sweep.parent_run_id = run.info.run_id
    for key in ("preset", "search", "scheduler", "num_samples", "seeds", "set", "grace_period",
                "reduction_factor", "optuna_seed", "cpus_per_trial", "gpus_per_trial", "max_failures"):
        client.log_param(sweep.parent_run_id, key, str(getattr(args, key)))
