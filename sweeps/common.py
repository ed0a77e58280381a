"""Shared machinery of the sweep scripts: flags, the Tune trainable, MLflow logging, Tuner
start/restore, the Parquet export and the result table.

A sweep script is short: it names its search-space module(s) and calls :func:`run_sweep` with a
``plan(sweep)`` that runs one or more phases (``sweep.run_phase(name, base, space)``). Everything
else — Ray, Optuna/ASHA, MLflow, ``--resume``, the export and the analysis hook — lives here, so
the same script runs on a laptop and, with ``--address auto``, on a ``ray up`` cluster.

Layout of one sweep (``--storage-path`` defaults to ``results/sweeps``)::

    <storage>/<script>-<preset>-<time>/sweep.json         the flags that define the sweep
    <storage>/<script>-<preset>-<time>/<phase>/           one Tune experiment per phase
    <storage>/<script>-<preset>-<time>/trials.parquet     one row per trial
    <storage>/<script>-<preset>-<time>/epochs.parquet     one row per trial and epoch
    <storage>/<script>-<preset>-<time>/<script>_table.csv the printed result table
"""
from __future__ import annotations

import argparse
import ast
import csv
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.sample import Domain

import search_spaces
from search_spaces import base as base_presets, learning_rates
from sweeps.preflight import (UsageError, check_address, check_cluster_resources, check_flags,
                              check_folder, check_local_resources, check_set_against_points,
                              check_tracking_uri, read_sweep_json)
from vpns_core.checkpoint import atomic_write
from vpns_core.config import Config, ConfigError
from vpns_core.registry import UnknownNameError

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("VPNS_RESULTS", PROJECT / "results")).resolve()
METRIC, MODE = "val_acc", "max"  # never the test set: Optuna and ASHA select on validation
TABLE_METRICS = ("selected_test_acc", "selected_test_acc_prompt", "selected_test_acc_noprompt",
                 "mask_stage_test_acc_prompt",
                 "mask_stage_test_acc_noprompt", "trial_time_s")
CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
# Flags that define a sweep: ``--resume`` takes them from sweep.json, not from the command line.
DEFINING = ("preset", "search", "scheduler", "num_samples", "seeds", "set", "data_root",
            "grace_period", "reduction_factor", "optuna_seed", "metric", "mode", "tracking_uri",
            "log_model", "download")
#: what a user's mistake raises before anything runs: one line on stderr, exit status 2
USER_ERRORS = (UsageError, ConfigError, UnknownNameError, FileNotFoundError)


# --- flags -----------------------------------------------------------------------------------


def build_parser(script: str, doc: str | None, search: str, scheduler: str,
                 num_samples: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python sweeps/{script}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset", choices=search_spaces.PRESETS, default="default",
        help="paper: ImageNet ResNet-18 on CIFAR-100 at 224 px (a GPU cluster); default: the "
             "embedded Lite0 -> Fashion-MNIST task sized for a CPU; tiny: seconds per trial")
    add("--search", choices=("grid", "optuna"), default=search,
        help=f"grid: every point of the space (the paper figure); optuna: seeded TPE over the "
             f"space plus both learning rates (with both fixed by --set: the space's points in a "
             f"seeded random order, none twice) (default: {search})")
    add("--scheduler", choices=("asha", "fifo"), default=scheduler,
        help=f"asha stops weak trials early at epochs grace*rf^k (default: {scheduler})")
    add("--num-samples", type=int, default=None,
        help=f"Optuna trials (default {num_samples}); under --search grid, repeats of the grid (default 1)")
    add("--max-concurrent", type=int, default=None, help="trials at once (default: as resources allow)")
    add("--seeds", type=int, nargs="+", default=None,
        help="seeds (a grid axis under --search grid; Optuna uses the first); default: the preset's")
    add("--address", default=None, help="Ray cluster to join ('auto' on a ray up head node); "
                                        "default: start a local Ray without dashboard")
    add("--storage-path", default=os.environ.get("VPNS_STORAGE", str(RESULTS / "sweeps")),
        help="where Tune keeps experiments and checkpoints: a folder every node sees on a "
             "cluster (default $VPNS_STORAGE or results/sweeps)")
    add("--tracking-uri", default=f"sqlite:///{RESULTS / 'mlflow.db'}",
        help="MLflow tracking store (http://host:5000 for a shared server)")
    add("--resume", nargs="?", const="latest", default=None, metavar="NAME",
        help="continue an interrupted sweep (NAME, or the latest one of this script and preset); "
             "finished trials are not re-run")
    add("--name", default=None, help="sweep name (default <script>-<preset>-<time>)")
    add("--cpus-per-trial", type=float, default=float(os.environ.get("VPNS_CPUS_PER_TRIAL", 1)),
        help="CPUs per trial, fractions allowed (default $VPNS_CPUS_PER_TRIAL or 1)")
    add("--gpus-per-trial", type=float, default=float(os.environ.get("VPNS_GPUS_PER_TRIAL", 0)),
        help="GPUs per trial, fractions allowed (default $VPNS_GPUS_PER_TRIAL or 0)")
    add("--max-failures", type=int, default=1, help="retries of a trial that raises before it is marked failed")
    add("--retry-failed", action="store_true", help="with --resume: run failed trials again from scratch")
    add("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    add("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/rf of the trials at each rung")
    add("--optuna-seed", type=int, default=0, help="seed of the Optuna sampler")
    add("--metric", default=METRIC, help="per-epoch metric Optuna and ASHA optimise (never a test metric)")
    add("--mode", choices=("max", "min"), default=MODE, help="maximise or minimise --metric")
    add("--log-model", action="store_true", help="log the exported sparse model to MLflow")
    add("--data-root", default=None, help="datasets folder all workers can see (paper datasets)")
    add("--download", action="store_true",
        help="download missing datasets and weights into --data-root / TORCH_HOME (never otherwise)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a fixed config field, e.g. --set train_subset=500 (repeatable)")
    return p


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=none", "c=pad"]`` -> ``{"a": 1, "b": None, "c": "pad"}`` (Python literals)."""
    names = {f.name for f in fields(Config)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise UsageError(f"--set {item}: expected FIELD=VALUE with FIELD a Config field")
        if text.lower() in ("none", "null"):
            out[key] = None
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


# --- configs and points ----------------------------------------------------------------------


def resolve(config: dict[str, Any], points: dict[str, dict] | None) -> dict[str, Any]:
    """A Tune config -> Config values: named-point axes (``{"pad": "none"}``) are replaced by
    the fields of their point (``prompt='none', pad_size=0``)."""
    values = dict(config)
    for axis, table in (points or {}).items():
        if axis in values:
            values.update(table[values.pop(axis)])
    return values


def driver_config(values: dict[str, Any]) -> Config:
    """``values`` validated in the driver. The device is checked where the trial runs: a CPU
    head node drives GPU trials."""
    return Config.from_dict({**values, "device": "auto"})


# --- the trainable (runs in a Ray worker) ------------------------------------------------------


def trainable(config: dict[str, Any], points: dict[str, dict] | None = None) -> None:
    """One vpns trial under Tune: report every epoch with the trial's checkpoint, resume from
    ``tune.get_checkpoint()``, and end with one ``final`` report carrying the selected
    accuracies and the artifacts (masks, layer stats, prompt PNG, exported model)."""
    cfg = Config.from_dict(resolve(config, points))
    cap_gpu_memory(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0), cfg.device)
    # Scratch space outside Tune's trial folder, which Tune copies to storage wholesale; what
    # must survive goes into the reported checkpoints. A leftover of a dead attempt is stale:
    # Tune's latest checkpoint is the truth.
    scratch = Path(os.environ.get("VPNS_SCRATCH", tempfile.gettempdir())) / "vpns-trials" / \
        tune.get_context().get_trial_id()
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _train(cfg, scratch)
    finally:  # also when ASHA stops the trial (SystemExit inside tune.report)
        shutil.rmtree(scratch, ignore_errors=True)
        if cfg.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # a reused actor's next trial starts with the GPU's memory free


def cap_gpu_memory(share: float, device: str) -> float | None:
    """Trials that share a GPU (``--gpus-per-trial 0.5``) each get at most their share of its
    memory, so one trial cannot starve the other into out-of-memory errors. Returns the cap."""
    if not 0 < share < 1 or device == "cpu" or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(share)
    return share


def _train(cfg: Config, scratch: Path) -> None:
    from vpns_core.train import run_trial

    workdir = scratch / "work"
    workdir.mkdir(parents=True)
    planned = cfg.total_epochs  # ASHA never stops a trial at its last epoch
    resume = False
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            folder = Path(folder)
            if (folder / FINAL).is_file():  # finished before the driver died: report it again
                _report_final(json.loads((folder / FINAL).read_text()), folder, scratch)
                return
            shutil.copyfile(folder / CHECKPOINT, workdir / CHECKPOINT)
            resume = True

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="report-") as tmp:
            _link(workdir / CHECKPOINT, Path(tmp) / CHECKPOINT)
            tune.report({**metrics, "planned_epochs": planned},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    # resume=False without a Tune checkpoint: an epoch Tune never saw must run (and report) again
    result = run_trial(cfg, workdir, reporter=report, resume=resume)
    final = {**result.final, "final": 1, "planned_epochs": planned}
    final[METRIC] = final.get("selected_val_acc", final.get(METRIC))  # the selected model's
    write_artifacts(cfg, workdir, scratch / "final", final)
    shutil.rmtree(workdir)
    _report_final(final, scratch / "final", scratch)


def _report_final(metrics: dict[str, Any], folder: Path, scratch: Path) -> None:
    with tempfile.TemporaryDirectory(dir=scratch, prefix="final-") as tmp:
        for item in folder.iterdir():
            _link(item, Path(tmp) / item.name)
        shutil.rmtree(scratch / "final", ignore_errors=True)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # checkpoint.pt is replaced atomically, so a hard link is a snapshot
    except OSError:
        shutil.copyfile(src, dst)


def write_artifacts(cfg: Config, workdir: Path, out: Path, final: dict[str, Any]) -> None:
    """Copy masks, layer stats (JSON and CSV) and the export; draw the prompt; write final.json."""
    import torch
    from torchvision.utils import save_image

    from vpns_core.prompts import build_prompt

    out.mkdir(parents=True, exist_ok=True)
    for name in ("masks.pt", "layer_stats.json", "model_export.pt"):
        _link(workdir / name, out / name)
    stats = json.loads((workdir / "layer_stats.json").read_text())
    with open(out / "layer_stats.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "numel", "kept", "density", "pruned"])
        writer.writeheader()
        writer.writerows(stats)
    if final.get("prompt_tunable", 0) > 0:
        export = torch.load(workdir / "model_export.pt", map_location="cpu", weights_only=True)
        prompt = build_prompt(cfg.prompt, input_size=cfg.input_size, output_size=cfg.output_size,
                              mean=export["mean"], std=export["std"], pad_size=cfg.pad_size,
                              prompt_size=cfg.resolved_prompt_size)
        prompt.load_state_dict(export["prompt"])
        image = prompt.image()
        scale = max(1, 256 // image.shape[-1])  # nearest-neighbour upscaling so pixels stay visible
        save_image(image.repeat_interleave(scale, 1).repeat_interleave(scale, 2), out / "prompt.png")
    (out / FINAL).write_text(json.dumps(final, indent=1, default=str))


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


# --- MLflow (runs in the driver) -------------------------------------------------------------


_TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
              "hostname", "node_ip", "date", "time_since_restore", "iterations_since_restore",
              "checkpoint_dir_name", "done", "trial_id", "experiment_tag", "should_checkpoint",
              "final", "planned_epochs"}
# Final-report keys kept as trial columns and MLflow metrics: the selected model's accuracies,
# and for channel methods the dense-vs-pruned measurements (vpns_core.structured.compare).
_FINAL_PREFIXES = ("selected_", "mask_stage_", "prompt_tunable", "prompt_input_fraction",
                   "prompt_image_fraction", "trial_time_s", "dense_", "pruned_", "speedup",
                   "memory_", "flops_", "params_ratio", "train_speedup", "train_memory_ratio",
                   "removal_max_abs_diff")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in _TUNE_KEYS and isinstance(v, (int, float))}


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
        from mlflow.entities import Metric
        state = self._run(trial)
        now = int(time.time() * 1000)
        epoch = int(result.get("epoch", 0))
        if result.get("final"):
            if not state.final:
                values = {k: v for k, v in _numeric(result).items() if k.startswith(_FINAL_PREFIXES)}
                values["final_epoch"] = epoch
                self.client.log_batch(state.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])
                state.final = True
        elif epoch > state.last_epoch:
            metrics = [Metric(k, v, now, epoch) for k, v in _numeric(result).items()]
            self.client.log_batch(state.run_id, metrics=metrics)
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
        error = _error_text(trial)
        self.client.set_tag(state.run_id, "error", error[-5000:])
        self.client.set_tag(state.run_id, "failures", str(trial.num_failures))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "error.txt").write_text(error)
            self.client.log_artifact(state.run_id, str(Path(tmp) / "error.txt"))
        self.client.set_terminated(state.run_id, status="FAILED")


def _error_text(trial) -> str:
    error = trial.get_pickled_error() or trial.get_error()
    if error is None and trial.error_file and os.path.isfile(trial.error_file):
        # Tune writes the error next to the driver first and copies it to storage later: an
        # on_trial_error callback (no retries left) may run before that copy exists.
        error = Path(trial.error_file).read_text()
    return str(error) if error is not None else "unknown error"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# --- one sweep -------------------------------------------------------------------------------


class SweepInterrupted(Exception):
    """A phase stopped before all its trials ended (Ctrl-C); ``--resume`` continues it."""


@dataclass
class Phase:
    """The records of one finished (or interrupted) phase."""

    name: str
    axes: dict[str, list]  # discrete axis -> its values (labels) in the space's order
    records: list[dict[str, Any]]
    complete: bool
    checked_only: bool = False  # a dry run's phase: validated, never run


@dataclass
class Sweep:
    script: str
    name: str
    args: argparse.Namespace
    dir: Path
    resuming: bool
    experiment_id: str = ""
    parent_run_id: str = ""
    default_samples: int = 8  # Optuna trials when --num-samples is not given (per script)
    phases: list[Phase] = field(default_factory=list)
    #: a dry run checks every phase's space (points, --set, data, weights, ASHA's rungs) and runs
    #: nothing; a plan that needs a phase's results to build the next stops after that phase
    dry_run: bool = False

    @property
    def preset(self) -> str:
        return self.args.preset

    @property
    def seeds(self) -> list[int]:
        return list(self.args.seeds or base_presets.seeds(self.preset))

    def run_phase(self, name: str, base: dict[str, Any], space: dict[str, Any], *,
                  seed_axis: bool = True) -> Phase:
        """Run (or resume) one Tune experiment over ``space`` on top of ``base``; in a dry run,
        only check it (raises a user error naming the flag or field)."""
        args = self.args
        overrides = parse_overrides(args.set)
        check_set_against_points(overrides, {k: v for k, v in space.items() if isinstance(v, dict)})
        fixed = {**base, **runtime_fields(args, base.get("num_workers", 0)), **overrides}
        if args.data_root:
            fixed["data_root"] = str(Path(args.data_root).resolve())
        fixed["tags"] = {**fixed.get("tags", {}), "sweep": self.name, "preset": self.preset}
        axes = dict(space)
        if args.search == "optuna":
            axes.update({k: v for k, v in learning_rates.space(self.preset).items() if k not in axes})
        axes = {k: v for k, v in axes.items() if k not in overrides}  # --set FIELD fixes an axis
        if seed_axis and "seed" not in overrides:
            if args.search == "grid":
                axes["seed"] = self.seeds
            else:
                fixed["seed"] = self.seeds[0]
        for key in axes:
            fixed.pop(key, None)
        points = {k: v for k, v in axes.items() if isinstance(v, dict)}
        check_points(fixed, axes)
        if self.dry_run:
            check_resources(point_configs(fixed, axes, points), download=args.download)
            if args.scheduler == "asha":
                longest = max(driver_config(c).total_epochs for c in point_configs(fixed, axes, points))
                if args.grace_period >= max(longest, 1):
                    raise UsageError(f"--grace-period {args.grace_period}: the trials of phase "
                                     f"'{name}' train {longest} epochs, so ASHA could never stop "
                                     f"one; use fewer than {longest}")
            phase = Phase(name, listed_axes(axes), [], complete=True, checked_only=True)
            self.phases.append(phase)
            return phase
        prepare_resources(point_configs(fixed, axes, points), download=args.download)
        order = listed_axes(axes)  # results keep the space's order
        label_keys = list(order)
        run_order = longest_first(fixed, axes, points) if args.search == "grid" else axes
        param_space = {**fixed, **{k: _tune_axis(v, args.search) for k, v in run_order.items()}}
        tracker = MLflowTracker(
            tracking_uri=args.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, points=points, label_keys=label_keys,
            log_model=args.log_model,
            tags={"sweep": self.name, "phase": name, "script": self.script, "preset": self.preset,
                  "mlflow.source.git.commit": _git_commit(), "search": args.search,
                  "scheduler": args.scheduler})
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        fn = tune.with_resources(tune.with_parameters(trainable, points=points), resources)
        path = self.dir / name
        if self.resuming and tune.Tuner.can_restore(str(path)):
            print(f"[{self.name}] resuming phase '{name}' from {path}", flush=True)
            tuner = tune.Tuner.restore(str(path), trainable=fn, resume_errored=False,
                                       restart_errored=args.retry_failed)
        else:
            tuner = tune.Tuner(fn, param_space=param_space,
                               tune_config=self._tune_config(fixed, axes),
                               run_config=tune.RunConfig(
                                   name=name, storage_path=str(self.dir), callbacks=[tracker],
                                   failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                   verbose=1))
        try:
            tuner.fit()
        except tune.TuneError as err:  # e.g. "trials did not complete": the records say which
            print(f"[{self.name}] Tune reported: {err}", file=sys.stderr)
        records = collect(path, name, points)
        phase = Phase(name, order, records,
                      complete=all(r["status"] in ("TERMINATED", "ERROR") for r in records))
        self.phases.append(phase)
        if not phase.complete:  # Ctrl-C: Tune saved its state; later phases must not start
            raise SweepInterrupted(name)
        return phase

    def _tune_config(self, fixed: dict[str, Any], axes: dict[str, Any]) -> tune.TuneConfig:
        args = self.args
        search_alg = None
        num_samples = args.num_samples or 1
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            num_samples = args.num_samples or self.default_samples
            finite = listed_axes(axes)
            if len(finite) == len(axes):  # every axis a list of points: sample without replacement
                size = math.prod(len(v) for v in finite.values())
                if num_samples > size:
                    print(f"[{self.name}] --num-samples {num_samples} > the {size} points of the "
                          f"space: running {size} (a point twice repeats a seeded trial exactly)",
                          flush=True)
                    num_samples = size
                sampler = ShuffledGridSampler(finite, seed=args.optuna_seed)
            else:
                sampler = optuna.samplers.TPESampler(seed=args.optuna_seed)
            search_alg = OptunaSearch(sampler=sampler)
        if args.scheduler == "asha":
            epochs = max(driver_config(c).total_epochs
                         for c in point_configs(fixed, axes, {k: v for k, v in axes.items()
                                                               if isinstance(v, dict)}))
            scheduler = StageASHA(time_attr="epoch", max_t=max(epochs, 1),
                                  grace_period=args.grace_period, reduction_factor=args.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        return tune.TuneConfig(metric=args.metric, mode=args.mode, search_alg=search_alg, scheduler=scheduler,
                               num_samples=num_samples, max_concurrent_trials=args.max_concurrent,
                               trial_dirname_creator=_trial_dirname,
                               reuse_actors=True)  # saves starting a process + torch per trial


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _tune_axis(values: Any, search: str) -> Any:
    if isinstance(values, Domain):
        return values
    labels = list(values)  # a list of field values, or the labels of named points
    return tune.grid_search(labels) if search == "grid" else tune.choice(labels)


def runtime_fields(args: argparse.Namespace, preset_workers: int = 0) -> dict[str, Any]:
    """Per-trial runtime: one torch thread per reserved CPU (oversubscribed threads are up to
    60x slower when trials share cores), CUDA when GPUs are reserved, never download in a trial,
    and no more data-loading workers than the reserved CPUs leave beside the training process
    (the preset's count at most)."""
    threads = max(1, math.floor(args.cpus_per_trial))
    return {"num_threads": threads, "device": "cuda" if args.gpus_per_trial > 0 else "cpu",
            "download": False, "num_workers": min(preset_workers, threads - 1)}


def listed_axes(axes: dict[str, Any]) -> dict[str, list]:
    """The axes given as lists of values or named points (not Tune domains), as label lists."""
    return {k: list(v) for k, v in axes.items() if not isinstance(v, Domain)}


def point_configs(fixed: dict[str, Any], axes: dict[str, Any],
                  points: dict[str, dict]) -> list[dict[str, Any]]:
    """Config values for every combination of the discrete axes (Tune domains left at the base)."""
    discrete = listed_axes(axes)
    combos = []
    for values in itertools.product(*discrete.values()):
        combos.append(resolve({**fixed, **dict(zip(discrete, values))}, points))
    return combos


def longest_first(fixed: dict[str, Any], axes: dict[str, Any],
                  points: dict[str, dict]) -> dict[str, Any]:
    """The grid's run order: each listed axis's values by the most epochs a trial with that
    value trains, longest first (ties keep the space's order). Trials of the sparsity curves
    train 2 to 13 epochs; started last, the 13-epoch LTH trials left a core idle for minutes at
    the end of the sweep."""
    discrete = listed_axes(axes)
    cost = {k: dict.fromkeys(v, 0) for k, v in discrete.items()}
    for values in itertools.product(*discrete.values()):
        epochs = driver_config(resolve({**fixed, **dict(zip(discrete, values))}, points)).total_epochs
        for key, label in zip(discrete, values):
            cost[key][label] = max(cost[key][label], epochs)
    return {k: sorted(v, key=lambda label, k=k: -cost[k][label]) if k in discrete else v
            for k, v in axes.items()}


def check_points(fixed: dict[str, Any], axes: dict[str, Any]) -> None:
    """Validate every discrete point before any trial starts (errors name the field); Tune
    domains are checked with one sample."""
    points = {k: v for k, v in axes.items() if isinstance(v, dict)}
    samples = {k: v.sample() for k, v in axes.items() if isinstance(v, Domain)}
    for values in point_configs(fixed, axes, points):
        driver_config({**values, **samples})


def check_resources(configs: list[dict[str, Any]], download: bool = False) -> None:
    """Datasets and weights of ``configs`` are on disk, or (``download``) can be fetched: checked
    without writing or downloading anything (the dry run's check)."""
    from vpns_core.data import check_available
    from vpns_core.models import check_model
    for name, root in sorted({(c.get("dataset", "fashion_mnist"), c.get("data_root")) for c in configs},
                             key=str):
        check_available(name, root, download)
    for model, pretrained, checkpoint in sorted({(c.get("model", "efficientnet_lite0"), c.get("pretrained", True),
                                                  c.get("source_checkpoint")) for c in configs}, key=str):
        check_model(model, pretrained and checkpoint is None, checkpoint, allow_download=download)


def prepare_resources(configs: list[dict[str, Any]], download: bool = True) -> None:
    """Datasets and pretrained weights, once, in the driver, before any trial starts.

    Trials then only read them (``download=False``) from ``data_root`` and ``TORCH_HOME``, which
    must be paths every worker sees (shared storage, or prepared on every node by the cluster's
    setup commands: ``python -m sweeps.prepare``). Raises with the fix when something is missing.
    """
    for name, root in sorted({(c.get("dataset", "fashion_mnist"), c.get("data_root")) for c in configs},
                             key=str):
        prepare_dataset(name, root, download)
    for model in sorted({(c.get("model", "efficientnet_lite0"), c.get("pretrained", True),
                          c.get("source_checkpoint")) for c in configs}, key=str):
        prepare_model(*model, download=download)


def prepare_dataset(name: str, root: str | None, download: bool = True) -> None:
    from vpns_core.data import DATASETS, check_available
    try:
        check_available(name, root, download=False)
    except FileNotFoundError:
        spec = DATASETS.get(name, "dataset")
        if not (download and spec.downloadable and root):
            raise
        for train in (True, False):
            spec.load(Path(root), train, True)
        check_available(name, root, download=False)


def prepare_model(name: str, pretrained: bool, checkpoint: str | None, download: bool = True) -> None:
    from vpns_core.models import build_model, check_model
    try:
        check_model(name, pretrained and checkpoint is None, checkpoint, allow_download=False)
    except FileNotFoundError:
        if not download:
            raise
        build_model(name, pretrained=pretrained, source_checkpoint=checkpoint)  # downloads


# --- records, export, table ------------------------------------------------------------------


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
        error = _error_text(trial) if trial.status == "ERROR" else None
        records.append({
            "phase": phase, "trial_id": trial.trial_id, "status": trial.status,
            "labels": {k: trial.config[k] for k in trial.config if k in points or k in ("seed",)},
            "tune_config": dict(trial.config), "config": resolve(trial.config, points),
            "final": final, "epochs": [epochs[e] for e in sorted(epochs)], "error": error,
            "num_failures": trial.num_failures,
            "checkpoint": trial.checkpoint.path if trial.checkpoint is not None else None,
        })
    return records


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
                   "wall_time_s": last.get("wall_time_s")}
            row.update({f"axis.{k}": str(v) for k, v in r["tune_config"].items()
                        if k in phase.axes})
            row.update({f"config.{k}": _cell(v) for k, v in r["config"].items()})
            for key, value in (r["final"] or {}).items():
                if key.startswith(_FINAL_PREFIXES):
                    row[key] = value
            for key, value in last.items():
                if key not in _TUNE_KEYS and key not in row and not isinstance(value, (dict, list)):
                    row[f"last.{key}"] = value
            trial_rows.append(row)
            for e in r["epochs"]:
                epoch_rows.append({"sweep": sweep.name, "phase": r["phase"], "trial_id": r["trial_id"],
                                   **{k: v for k, v in e.items()
                                      if k not in _TUNE_KEYS and not isinstance(v, (dict, list))}})
    out = (sweep.dir / "trials.parquet", sweep.dir / "epochs.parquet")
    for rows, path in zip((trial_rows, epoch_rows), out):
        keys = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows])
        atomic_write(path, lambda handle, table=table: pq.write_table(table, handle))
    return out


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def result_table(phase: Phase) -> list[dict[str, Any]]:
    """Per point of the phase's discrete axes (seeds pooled): trials done / stopped / failed and
    mean ± std of the selected (validation-chosen) test accuracies."""
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
            if values:
                mean = sum(values) / len(values)
                row[metric] = mean
                row[metric + "_std"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                        if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def best_record(phase: Phase) -> dict[str, Any] | None:
    """The finished trial with the highest selected validation accuracy (never the test set)."""
    done = sorted((r for r in phase.records if r["final"] is not None), key=lambda r: r["trial_id"])
    return max(done, key=lambda r: r["final"].get("selected_val_acc", r["final"].get(METRIC, -1)),
               default=None)  # ties: the first trial Tune created


def print_table(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    for phase in sweep.phases:
        body = [r for r in rows if r["phase"] == phase.name]
        keys = [k for k in phase.axes if k != "seed"]
        metrics = [m for m in TABLE_METRICS if any(m in r for r in body)]
        header = keys + ["done", "stopped", "failed"] + metrics
        lines = [[str(r.get(k)) for k in keys + ["done", "stopped", "failed"]]
                 + [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if m in r else "-" for m in metrics]
                 for r in body]
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
        pooled = "seeds" if sweep.args.search == "grid" else "the point's trials (sampled learning rates pooled)"
        print(f"\n{sweep.script} [{sweep.preset}] phase '{phase.name}' ({len(phase.records)} trials; "
              f"accuracies: test set at the epoch chosen on validation, mean ± std over {pooled})")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        best = best_record(phase)
        if best is not None:
            cfg = {k: best["tune_config"][k] for k in best["tune_config"]
                   if k in phase.axes or k in ("mask_lr", "tune_lr")}
            print(f"best (by validation): {cfg}  selected_test_acc="
                  f"{best['final'].get('selected_test_acc', float('nan')):.4f}")
        for r in phase.records:
            if r["status"] == "ERROR":
                print(f"FAILED {r['trial_id']} {r['labels']}: {(r['error'] or '').strip().splitlines()[-1:]}")


# --- entry point -----------------------------------------------------------------------------


def run_sweep(script: str, plan: Callable[[Sweep], None], argv: list[str] | None = None, *,
              doc: str | None = None, search: str = "optuna", scheduler: str = "asha",
              num_samples: int = 8, flags: Callable[[argparse.ArgumentParser], list[str]] | None = None) -> int:
    """Parse flags, check everything a user can get wrong (flags, ``--set``, every phase's
    space, data, weights, storage, tracking store, cluster) before Ray starts or anything is
    written, then start (or join) Ray, open the MLflow parent run, run ``plan(sweep)``, export
    Parquet, print the table and call the analysis hook. Returns the exit status: 2 with one
    line on stderr for a user's mistake.

    ``flags(parser)`` adds the script's own flags and returns their destinations: they define
    the sweep (``--resume`` takes them from sweep.json like the common ones). A start that fails
    before any trial ran marks the parent run FAILED and leaves no sweep folder behind, so the
    same ``--name`` can be used again."""
    parser = build_parser(script, doc, search, scheduler, num_samples)
    own = flags(parser) if flags is not None else []
    args = parser.parse_args(argv)
    args.own_flags = list(own)
    try:
        name, resuming = _preflight(script, args, plan, num_samples)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep = _create_sweep(script, args, name, resuming)
    sweep.default_samples = num_samples
    started = time.time()
    own_ray = not ray.is_initialized()
    ran = False
    try:
        if own_ray:
            if args.address:
                ray.init(address=args.address)
                check_cluster_resources(args, ray.cluster_resources())
            else:
                ray.init(include_dashboard=False)  # nothing listens beyond this machine
        _open_mlflow(sweep)
        print(f"[{sweep.name}] {args.search} search, {args.scheduler} scheduler, preset "
              f"{args.preset}; results in {sweep.dir}; MLflow {args.tracking_uri}", flush=True)
        ran = True
        try:
            plan(sweep)
        except SweepInterrupted:
            pass  # write what there is; _finish prints how to resume
        return _finish(sweep, time.time() - started)
    except USER_ERRORS as err:  # e.g. a cluster too small; checked before any trial started
        print(f"error: {err}", file=sys.stderr)
        _abandon(sweep, err, ran_trials=ran and any(p.records for p in sweep.phases))
        return 2
    finally:
        if own_ray:
            ray.shutdown()


def _preflight(script: str, args: argparse.Namespace, plan: Callable[[Sweep], None],
               num_samples: int) -> tuple[str, bool]:
    """Every check that needs no Ray and writes nothing; returns the sweep's name and whether it
    resumes. A dry run of ``plan`` checks each phase's space."""
    check_flags(args)
    check_folder("--storage-path", args.storage_path)
    storage = Path(args.storage_path).expanduser().resolve()
    name, resuming = _sweep_name(script, args, storage)
    check_flags(args)  # again: a resumed sweep's flags come from its sweep.json
    check_tracking_uri(args.tracking_uri)
    check_address(args.address)
    check_local_resources(args)
    dry = Sweep(script, name, args, storage / name, resuming, default_samples=num_samples, dry_run=True)
    plan(dry)
    return name, resuming


def _abandon(sweep: Sweep, err: BaseException, ran_trials: bool) -> None:
    """After a failed start: the parent run FAILED with the reason; a new sweep that ran no trial
    leaves no folder, so its name can be used again."""
    if sweep.parent_run_id:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(sweep.args.tracking_uri)
        client.set_tag(sweep.parent_run_id, "error", str(err)[:5000])
        client.set_terminated(sweep.parent_run_id, status="FAILED")
    if not sweep.resuming and not ran_trials:
        shutil.rmtree(sweep.dir, ignore_errors=True)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}")


def sweep_folder(storage: Path, name: str, flag: str = "--name") -> Path:
    """``storage / name`` for a sweep name given on the command line: one plain path component
    (letters, digits, ``._=+-``), so a name can never write outside the storage folder."""
    folder = (storage / name).resolve()
    if not _NAME.fullmatch(name) or ".." in name or folder.parent != storage.resolve():
        raise UsageError(f"{flag} {name!r}: a sweep name is one folder name (letters, digits and "
                         f"._=+- only, no '..' or path separators), created under {storage}")
    return folder


def _sweep_name(script: str, args: argparse.Namespace, storage: Path) -> tuple[str, bool]:
    """The sweep's name and whether it resumes; for ``--resume``, the saved defining flags are
    put back into ``args``. Writes nothing."""
    if args.name is not None:
        sweep_folder(storage, args.name)
    if args.resume not in (None, "latest"):
        sweep_folder(storage, args.resume, "--resume")
    if args.resume:
        name = args.name or (args.resume if args.resume != "latest" else None)
        if name is None:
            candidates = sorted(storage.glob(f"{script}-{args.preset}-*/sweep.json"),
                                key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise UsageError(f"--resume: no sweep of {script} ({args.preset}) under {storage}")
            name = candidates[-1].parent.name
        meta = storage / name / "sweep.json"
        if not meta.is_file():
            raise UsageError(f"--resume {name}: {meta} not found")
        saved = read_sweep_json(meta)
        missing = [k for k in (*DEFINING, *args.own_flags) if k not in saved["args"]]
        for key in (*DEFINING, *args.own_flags):
            if key in saved["args"]:
                setattr(args, key, saved["args"][key])
        if missing and missing != ["download"]:  # written by another script or version
            raise UsageError(f"--resume {name}: {meta} lacks the flags {missing}")
        return name, True
    name = args.name or f"{script}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (storage / name / "sweep.json").exists():
        raise UsageError(f"--name {name}: {storage / name} exists; pass --resume {name} to "
                         f"continue it, or another --name")
    return name, False


def _create_sweep(script: str, args: argparse.Namespace, name: str, resuming: bool) -> Sweep:
    """The sweep's folder and, for a new sweep, its ``sweep.json`` (written atomically)."""
    folder = Path(args.storage_path).expanduser().resolve() / name
    if not resuming:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"script": script, "name": name, "args": vars(args)}, indent=1)
        atomic_write(folder / "sweep.json", lambda handle: handle.write(text.encode()))
    return Sweep(script, name, args, folder, resuming=resuming)


def _open_mlflow(sweep: Sweep) -> None:
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
        "search": args.search, "scheduler": args.scheduler, "mlflow.source.git.commit": _git_commit()})
    sweep.parent_run_id = run.info.run_id
    for key in ("preset", "search", "scheduler", "num_samples", "seeds", "set", "grace_period",
                "reduction_factor", "optuna_seed", "cpus_per_trial", "gpus_per_trial", "max_failures"):
        client.log_param(sweep.parent_run_id, key, str(getattr(args, key)))


def _close_parent(sweep: Sweep, status: str) -> None:
    from mlflow.tracking import MlflowClient
    MlflowClient(sweep.args.tracking_uri).set_terminated(sweep.parent_run_id, status=status)


def _finish(sweep: Sweep, elapsed: float) -> int:
    from mlflow.tracking import MlflowClient

    import analysis

    client = MlflowClient(sweep.args.tracking_uri)
    children = client.search_runs([sweep.experiment_id], max_results=10000,
                                  filter_string=f"tags.sweep = '{sweep.name}' and tags.role = 'trial'")
    run_ids = {run.data.tags.get("trial_id"): run.info.run_id for run in children}
    trials_path, epochs_path = export_parquet(sweep, run_ids)
    rows = [row for phase in sweep.phases for row in result_table(phase)]
    print_table(sweep, rows)
    outputs = analysis.sweep_figure(sweep.script, rows, trials_path, epochs_path, sweep.dir)
    failed = sum(r["status"] == "ERROR" for p in sweep.phases for r in p.records)
    complete = all(p.complete for p in sweep.phases)
    for path in (trials_path, epochs_path, *outputs):
        client.log_artifact(sweep.parent_run_id, str(path))
    client.log_metric(sweep.parent_run_id, "failed_trials", failed)
    client.log_metric(sweep.parent_run_id, "sweep_wall_time_s", elapsed)
    client.set_terminated(sweep.parent_run_id, status="FINISHED" if complete else "KILLED")
    print(f"\n[{sweep.name}] {sum(len(p.records) for p in sweep.phases)} trials, {failed} failed, "
          f"{elapsed:.0f} s. Parquet: {trials_path}, {epochs_path}; outputs: "
          f"{', '.join(map(str, outputs))}; MLflow experiment '{sweep.script}' at "
          f"{sweep.args.tracking_uri}", flush=True)
    if not complete:
        print(f"interrupted: continue with  python sweeps/{sweep.script}.py --resume {sweep.name}")
        return 130
    return 1 if failed else 0
