"""A sweep and its entry point: :func:`run_sweep` parses the flags, checks everything a user can
get wrong, starts (or joins) Ray, opens the MLflow parent run, runs the script's ``plan(sweep)``
(one or more phases, ``sweep.run_phase(name, base, space)``), exports Parquet, prints the table
and calls the analysis hook.

A sweep script is short: it names its search-space module(s) and a plan (:func:`single_phase`
for one space). The same script runs on a laptop and, with ``--address auto``, on a ``ray up``
cluster.

Layout of one sweep (``--storage-path`` defaults to ``results/sweeps``)::

    <storage>/<script>-<preset>-<time>/sweep.json         the flags that define the sweep
    <storage>/<script>-<preset>-<time>/driver.lock        held by the driver running it (sweeps.lock)
    <storage>/<script>-<preset>-<time>/<phase>/           one Tune experiment per phase
    <storage>/<script>-<preset>-<time>/trials.parquet     one row per trial
    <storage>/<script>-<preset>-<time>/epochs.parquet     one row per trial and epoch
    <storage>/<script>-<preset>-<time>/<script>_table.csv the printed result table
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from search_spaces import base as base_presets
from search_spaces.points import (check_points, driver_config, listed_axes, longest_first,
                                  named_points, point_configs)
from sweeps import lock
from sweeps.code_version import git_commit
from sweeps.errors import UsageError
from sweeps.flags import (DEFINING, RESULTS, USER_ERRORS, build_parser, parse_overrides, resolve_gpus_per_trial,
                          runtime_fields, trials_on)
from sweeps.preflight import (check_address, check_cluster_resources, check_flags, check_folder,
                              check_local_resources, check_set_against_space,
                              check_tracking_uri, read_sweep_json)
from sweeps.resources import check_resources, prepare_resources
from vpns_core.config import Config, check_label_mapping_samples
from vpns_core.errors import ConfigError
from vpns_core.files import atomic_write

# Ray, Tune, MLflow and torch are imported where a sweep runs, not here: a user's mistake that
# the flags show is refused before any of them loads (they take seconds to import).
if TYPE_CHECKING:  # pragma: no cover
    from sweeps.data_parallel import Scaling
    from sweeps.results import Phase
    from sweeps.schedulers import PhaseSearch


#: exit status of a sweep whose trials all ran but whose MLflow runs are incomplete (the tracking
#: server went away): the results are safe in Tune's storage and the Parquet export, and
#: ``--resume NAME`` back-fills MLflow once the server answers
UNLOGGED = 3
#: exit status of a sweep whose Ray (raylet or head node) was lost under it: what finished is in
#: the Parquet export, the unfinished trials' MLflow runs are KILLED, ``--resume NAME`` continues
RAY_LOST = 4
#: exit status of a sweep stopped by Ctrl-C (SIGINT): as :data:`RAY_LOST`, 128 + SIGINT
INTERRUPTED = 130
#: system settings of the local Ray a sweep starts (``ray.init`` without ``--address``). Ray
#: pre-starts one idle Python worker per CPU when the first driver connects; Tune's trial actors
#: start workers of their own and never use those (they exit idle 10 s later), and on 2 cores
#: starting them costs a tiny one-trial sweep 15% of its CPU time and 5 s of wall time (measured).
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}



TUNER_STATE, TUNER_STATE_COPY = "tuner.pkl", "tuner.pkl.last"


def keep_tuner_state(path: Path) -> None:
    """A whole copy of Tune's ``tuner.pkl`` (written when the Tuner was made or restored) beside
    it: Tune rewrites the file in place, so a driver killed while it writes leaves it empty."""
    state = path / TUNER_STATE
    if state.is_file() and state.stat().st_size > 0:
        tmp = path / (TUNER_STATE_COPY + ".tmp")
        shutil.copyfile(state, tmp)
        os.replace(tmp, path / TUNER_STATE_COPY)


def recover_tuner_state(path: Path) -> None:
    """Put the copy back when ``tuner.pkl`` is empty (its writer was killed), so the phase
    resumes instead of failing to unpickle nothing."""
    state, copy = path / TUNER_STATE, path / TUNER_STATE_COPY
    if state.is_file() and state.stat().st_size == 0 and copy.is_file():
        shutil.copyfile(copy, state)


class SweepInterrupted(Exception):
    """A phase stopped before all its trials ended (Ctrl-C); ``--resume`` continues it."""

    reason = "interrupted (Ctrl-C)"
    status = INTERRUPTED


class RayLost(SweepInterrupted):
    """Ray (the raylet or the head node) went away under a phase; ``--resume`` continues it."""

    status = RAY_LOST

    def __init__(self, phase: str, why: str) -> None:
        self.reason = f"Ray was lost under the sweep ({why})"
        super().__init__(phase)

    @classmethod
    def from_error(cls, phase: str, err: BaseException) -> RayLost:
        text = " ".join(str(err).split())
        return cls(phase, f"{type(err).__name__}: {text[:160] + '...' if len(text) > 160 else text}")


@dataclass
class Sweep:
    script: str
    name: str
    args: argparse.Namespace
    dir: Path
    resuming: bool
    experiment_id: str = ""
    parent_run_id: str = ""
    view: str = ""  # the id of the experiment's saved view of this sweep's trials
    default_samples: int = 8  # Optuna trials when --num-samples is not given (per script)
    phases: list[Phase] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)  # trial id -> its MLflow run
    unlogged: dict[str, str] = field(default_factory=dict)  # trial id -> why MLflow lacks it
    #: a dry run checks every phase's space (points, --set, data, weights, ASHA's rungs) and runs
    #: nothing; a plan that needs a phase's results to build the next stops after that phase
    dry_run: bool = False
    #: whether Ray's state API answers (data-parallel trials; see sweeps.data_parallel.Scaling)
    state_api: bool = True
    #: set when the driver's Ray died under the sweep (see :func:`_supervise`): each phase then
    #: only reads what Tune saved, closes its MLflow runs and raises this
    lost: RayLost | None = None

    @property
    def preset(self) -> str:
        return self.args.preset

    @property
    def seeds(self) -> list[int]:
        return list(self.args.seeds or base_presets.seeds(self.preset))

    def run_phase(self, name: str, base: dict[str, Any], space: dict[str, Any], *,
                  seed_axis: bool = True, search: PhaseSearch | str | None = None) -> Phase:
        """Run (or resume) one Tune experiment over ``space`` on top of ``base``; in a dry run,
        only check it (raises a user error naming the flag or field).

        ``search`` says how the phase searches: None, as the sweep's ``--search`` and
        ``--scheduler`` say; ``"grid"``, every point of ``space`` once with FIFO whatever the
        flags (e.g. a reference phase of an Optuna sweep); a :class:`PhaseSearch`, its own
        searcher over its own (define-by-run) space with FIFO (``space`` must be empty)."""
        args = self.args
        custom = search if search is not None and not isinstance(search, str) else None  # a PhaseSearch
        kind = "custom" if custom else (search or args.search)
        if custom and space:
            raise ValueError(f"phase '{name}': a PhaseSearch defines the space; got axes {list(space)}")
        if custom or search == "grid":  # the phase's own searcher: flags that say so
            args = argparse.Namespace(**{**vars(args), "search": "grid" if kind == "grid" else "optuna",
                                         "scheduler": "fifo",
                                         "num_samples": args.num_samples if custom else None})
        overrides = parse_overrides(args.set)
        check_set_against_space(overrides, space)
        fixed = {**base, **runtime_fields(args, base.get("num_workers")), **overrides}
        if args.data_root:
            fixed["data_root"] = str(Path(args.data_root).resolve())
        fixed["tags"] = {**fixed.get("tags", {}), "sweep": self.name, "preset": self.preset}
        axes = dict(space)
        if kind == "optuna":
            from search_spaces import learning_rates
            axes.update({k: v for k, v in learning_rates.space(self.preset).items() if k not in axes})
        # --set fixes a learning rate Optuna would search (the space's own axes are refused above)
        axes = {k: v for k, v in axes.items() if k not in overrides}
        if seed_axis:
            if kind == "grid":
                axes["seed"] = self.seeds
            else:
                fixed["seed"] = self.seeds[0]
        for key in axes:
            fixed.pop(key, None)
        if custom:
            custom.check_overrides(overrides)
        points = named_points(axes)
        if "label_mapping_samples" in overrides:  # given on purpose: no more than the split has
            for values in point_configs(fixed, axes, points):
                check_label_mapping_samples(values["label_mapping_samples"],
                                            values.get("train_subset", Config.train_subset))
        check_points(fixed, axes)
        configs = point_configs(fixed, axes, points)
        if custom:  # its space's corners, e.g. every method at both ends of its range
            configs = [{**c, **corner} for c in configs for corner in custom.configs()]
            for values in configs:
                driver_config(values)
        from sweeps.results import Phase
        if self.dry_run:
            check_resources(configs, download=args.download)
            check_workers(args.workers_per_trial, configs)
            if args.scheduler == "asha":
                longest = max(driver_config(c).total_epochs for c in configs)
                if args.grace_period >= max(longest, 1):
                    raise UsageError(f"--grace-period {args.grace_period}: the trials of phase "
                                     f"'{name}' train {longest} epochs, so ASHA could never stop "
                                     f"one; use fewer than {longest}")
            phase = Phase(name, listed_axes(axes), [], complete=True, checked_only=True)
            self.phases.append(phase)
            return phase
        import ray
        from ray import tune

        from sweeps.data_parallel import PlacementGroupReaper, Scaling
        from sweeps.results import collect
        from sweeps.schedulers import tune_axis, tune_config
        from sweeps.tracking import MLflowTracker
        from sweeps.trainable import trainable
        path = self.dir / name
        recover_tuner_state(path)
        if self.lost is not None and not tune.Tuner.can_restore(str(path)):
            raise self.lost  # the phase never started
        if self.lost is None:
            prepare_resources(configs, download=args.download)
        order = listed_axes(axes)  # results keep the space's order
        if custom:  # sampled: no listed values, but the labels name every trial
            order.update({k: [] for k in custom.label_keys if k not in order})
        label_keys = list(order)
        run_order = longest_first(fixed, axes, points) if kind == "grid" else axes
        param_space = {**fixed, **{k: tune_axis(v, args.search) for k, v in run_order.items()}}
        tracker = MLflowTracker(
            tracking_uri=args.tracking_uri, experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id, points=points, label_keys=label_keys,
            log_model=args.log_model,
            tags={"sweep": self.name, "phase": name, "script": self.script, "preset": self.preset,
                  "mlflow.source.git.commit": git_commit(),
                  "search": custom.name if custom else args.search, "scheduler": args.scheduler})
        scaling = Scaling(workers=args.workers_per_trial, cpus=args.cpus_per_trial,
                          gpus=args.gpus_per_trial, storage=str(self.dir / "train" / name),
                          state_api=self.state_api)
        fn = tune.with_resources(tune.with_parameters(trainable, points=points, scaling=scaling),
                                 scaling.trial_resources())
        if self.lost is not None:
            tuner = None  # read what Tune saved before Ray went away
        elif self.resuming and tune.Tuner.can_restore(str(path)):
            print(f"[{self.name}] resuming phase '{name}' from {path}", flush=True)
            tuner = tune.Tuner.restore(str(path), trainable=fn, resume_errored=False,
                                       restart_errored=args.retry_failed)
        else:
            # a stopped data-parallel trial's driver takes more than Tune's 2 s to stop its
            # workers, which fails a reuse of its actor
            runtime = dict(default_samples=self.default_samples,
                           max_concurrent=concurrent_trials(scaling), reuse_actors=scaling.workers == 1)
            config = (custom.tune_config(args, **runtime) if custom
                      else tune_config(args, fixed, axes, sweep_name=self.name, **runtime))
            tuner = tune.Tuner(fn, param_space=param_space, tune_config=config,
                               run_config=tune.RunConfig(
                                   name=name, storage_path=str(self.dir),
                                   # the reaper always: a resumed sweep may change N
                                   callbacks=[tracker, PlacementGroupReaper(scaling.storage)],
                                   failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                   checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                   verbose=1))
        if tuner is not None:
            keep_tuner_state(path)
        stop: SweepInterrupted | None = None
        try:
            if tuner is not None:
                tuner.fit()
        except tune.TuneError as err:  # e.g. "trials did not complete": the records say which
            print(f"[{self.name}] Tune reported: {err}", file=sys.stderr)
        except ray.exceptions.RayError as err:  # Tune keeps a trial's errors; this is Ray's own
            stop = RayLost.from_error(name, err)
            print(f"[{self.name}] {stop.reason}; saving what finished", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's own handler
            stop = SweepInterrupted(name)
        records = collect(path, name, points)
        run_ids, unlogged = tracker.backfill(path, records)
        self.run_ids.update(run_ids)
        self.unlogged.update(unlogged)
        phase = Phase(name, order, records,
                      complete=all(r["status"] in ("TERMINATED", "ERROR") for r in records))
        self.phases.append(phase)
        if stop is None and not phase.complete:  # Ctrl-C (Tune saved its state), or Ray lost
            stop = self.lost or SweepInterrupted(name)
        if stop is not None:  # later phases must not start
            phase.complete = False
            self.unlogged.update(tracker.mark_killed(records, stop.reason))
            raise stop
        return phase


def check_workers(workers: int, configs: list[dict[str, Any]]) -> None:
    """Every trial of a phase can run on ``workers`` data-parallel workers (its method, its
    batch size), before anything starts."""
    from vpns_core.distributed import check_data_parallel
    for values in configs:
        try:
            check_data_parallel(driver_config(values), workers)
        except ConfigError as err:
            raise UsageError(f"--workers-per-trial {workers}: {err}") from None


def concurrent_trials(scaling: Scaling) -> int | None:
    """Trials at once for data-parallel trials: as many as the cluster's CPUs and GPUs hold whole
    worker groups. (Their drivers reserve no CPU, so Tune alone would start every trial and
    leave their Train runs waiting for workers.) None for one-worker trials: Tune's own limit."""
    if scaling.workers == 1:
        return None
    import ray
    have = ray.cluster_resources()
    fits = [int(have.get(key, 0.0) // (scaling.workers * need))
            for key, need in (("CPU", scaling.cpus), ("GPU", scaling.gpus)) if need > 0]
    return max(1, min(fits)) if fits else None


def state_api_answers(timeout: float = 3.0) -> bool:
    """Whether Ray's state API answers (it needs the dashboard, which a local sweep does not
    start)."""
    from ray.util.state import list_nodes
    try:
        list_nodes(limit=1, timeout=timeout, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - any failure means: not available
        return False
    return True


def single_phase(space: ModuleType) -> Callable[[Sweep], None]:
    """The plan of a one-phase sweep: the search-space module's ``space(preset)`` on its
    ``base(preset)``, as the phase ``trials``."""
    def plan(sweep: Sweep) -> None:
        sweep.run_phase("trials", space.base(sweep.preset), space.space(sweep.preset))
    return plan


def run_sweep(script: str, plan: Callable[[Sweep], None], argv: list[str] | None = None, *,
              doc: str | None = None, search: str = "optuna", scheduler: str = "asha",
              num_samples: int = 8, flags: Callable[[argparse.ArgumentParser], list[str]] | None = None,
              seeds: Callable[[str], tuple[int, ...]] | None = None) -> int:
    """Parse flags, check everything a user can get wrong (flags, ``--set``, every phase's
    space, data, weights, storage, tracking store, cluster) before Ray starts or anything is
    written, then start (or join) Ray, open the MLflow parent run, run ``plan(sweep)``, export
    Parquet, print the table and call the analysis hook. Returns the exit status: 2 with one
    line on stderr for a user's mistake or when another driver holds the sweep's folder
    (:mod:`sweeps.lock`); otherwise as :func:`_finish` says. From the command line (``argv``
    None) Ray runs in a child process (:func:`_supervise`), so that losing it ends the sweep
    with :data:`RAY_LOST` and its results saved.

    ``flags(parser)`` adds the script's own flags and returns their destinations: they define
    the sweep (``--resume`` takes them from sweep.json like the shared ones). ``seeds(preset)``
    replaces the preset's seeds when ``--seeds`` is not given (the confirmation's new seeds). A start that fails
    before any trial ran marks the parent run FAILED and leaves no sweep folder behind, so the
    same ``--name`` can be used again."""
    parser = build_parser(script, doc, search, scheduler, num_samples)
    own = flags(parser) if flags is not None else []
    args = parser.parse_args(argv)
    args.own_flags = list(own)
    if seeds is not None and args.seeds is None and not getattr(args, "resume", None):
        args.seeds = list(seeds(args.preset))
    try:
        name, resuming = _preflight(script, args, plan, num_samples)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        held = _hold(args, name, resuming)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ray

    sweep = _create_sweep(script, args, name, resuming)
    sweep.default_samples = num_samples
    started = time.time()
    try:
        if argv is None and not ray.is_initialized():  # a sweep started from the command line
            return _supervise(sweep, held, lambda lost: _drive(sweep, plan, started, lost is None, lost))
        return _drive(sweep, plan, started, own_ray=not ray.is_initialized())
    finally:
        held.release()


def _drive(sweep: Sweep, plan: Callable[[Sweep], None], started: float, own_ray: bool,
           lost: RayLost | None = None) -> int:
    """Start (or join) Ray unless ``own_ray`` is False, open the MLflow parent run, run ``plan``
    and :func:`_finish`; returns the exit status. With ``lost`` (the driver's Ray died), Ray is
    not started: each phase reads what Tune saved and the sweep ends as :data:`RAY_LOST`."""
    import ray

    from sweeps.tracking import open_mlflow, ui_command, ui_link
    args = sweep.args
    ran = False
    try:
        if own_ray:
            if args.address:
                ray.init(address=args.address)
                check_cluster_resources(args, ray.cluster_resources())
            else:
                ray.init(include_dashboard=False,  # nothing listens beyond this machine
                         _system_config=LOCAL_RAY_SYSTEM_CONFIG)
        if args.workers_per_trial > 1 and lost is None:
            sweep.state_api = state_api_answers()
        open_mlflow(sweep)
        link = ui_link(args.tracking_uri, sweep.experiment_id, sweep.view)
        command = ui_command(args.tracking_uri)
        if lost is None:
            print(f"[{sweep.name}] {args.search} search, {args.scheduler} scheduler, preset "
                  f"{args.preset}; {trials_on(args)}; results in {sweep.dir}; MLflow {args.tracking_uri} (trials by "
                  f"accuracy: {link})" + (f"\n[{sweep.name}] MLflow UI for this store: {command}"
                                          if command else ""), flush=True)
        ran = True
        sweep.lost = lost
        stop = None
        try:
            plan(sweep)
        except SweepInterrupted as err:
            stop = err  # write what there is; _finish prints how to resume
        return _finish(sweep, time.time() - started, stop)
    except USER_ERRORS as err:  # e.g. a cluster too small; checked before any trial started
        print(f"error: {err}", file=sys.stderr)
        _abandon(sweep, err, ran_trials=ran and any(p.records for p in sweep.phases))
        return 2
    finally:
        if own_ray:
            ray.shutdown()


#: the signal a supervised driver gets when the process that started it dies (prctl)
_ORPHANED = signal.SIGHUP


def _supervise(sweep: Sweep, held: lock.SweepLock, drive: Callable[[RayLost | None], int]) -> int:
    """Run ``drive(None)`` (the sweep with its Ray) in a child process of its own process group
    and return its exit status. Ray's core worker ends a driver whose raylet or head node is
    lost at once (exit 1, no Python code runs); then this process, which never joined Ray, says
    so in one line and runs ``drive(RayLost)``: the Parquet of what finished, the unfinished
    MLflow runs KILLED, the resume command, exit :data:`RAY_LOST`. Ctrl-C and SIGTERM reach the
    child as one SIGINT (Tune stops and saves); whatever of the child's group outlives it (Ray's
    processes) is killed, and the child kills its group when this process dies (SIGKILL)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(read_end)
            os.setpgid(0, 0)
            held.forget()  # the lock stays with the parent: it dies when the parent does
            signal.signal(_ORPHANED, lambda *_: os.killpg(0, signal.SIGKILL))
            _die_with(parent)
            status = drive(None)
        except BaseException:  # noqa: BLE001 - reported here; the child must never return
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(write_end, bytes([status & 0xFF]))
            os._exit(status)
    os.close(write_end)

    def forward(signum, frame) -> None:
        os.kill(child, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _, wait_status = os.waitpid(child, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reported = os.read(read_end, 1)
    os.close(read_end)
    try:
        os.killpg(child, signal.SIGKILL)  # Ray's processes the child left behind
    except (ProcessLookupError, PermissionError):
        pass
    if reported:
        return reported[0]
    how = (f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}" if os.WIFSIGNALED(wait_status)
           else f"exit {os.waitstatus_to_exitcode(wait_status)}")
    lost = RayLost("", f"its driver process ended ({how}): the raylet or head node went away, "
                       f"or the process was killed")
    print(f"[{sweep.name}] {lost.reason}; saving what finished", file=sys.stderr, flush=True)
    return drive(lost)


def _die_with(parent: int) -> None:
    """Have the kernel send :data:`_ORPHANED` to this process when ``parent`` dies (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(_ORPHANED), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request
        os.killpg(0, signal.SIGKILL)


def _hold(args: argparse.Namespace, name: str, resuming: bool) -> lock.SweepLock:
    """The sweep folder's lock (:mod:`sweeps.lock`), or a user error naming its holder. A new
    sweep whose name another driver took meanwhile is refused as ``_sweep_name`` refuses it."""
    folder = Path(args.storage_path).expanduser().resolve() / name
    flag = f"--resume {name}" if resuming else f"--name {name}"
    held = lock.acquire(folder, flag)
    if not resuming and (folder / "sweep.json").exists():
        held.release()
        raise UsageError(f"--name {name}: {folder} exists; pass --resume {name} to continue it, "
                         f"or another --name")
    return held


def _preflight(script: str, args: argparse.Namespace, plan: Callable[[Sweep], None],
               num_samples: int) -> tuple[str, bool]:
    """Every check that needs no Ray and writes nothing; returns the sweep's name and whether it
    resumes. A dry run of ``plan`` checks each phase's space. ``--gpus-per-trial`` left out is
    filled in here (:func:`sweeps.flags.resolve_gpus_per_trial`)."""
    resolve_gpus_per_trial(args)
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


def _finish(sweep: Sweep, elapsed: float, stop: SweepInterrupted | None = None) -> int:
    """Export, print and draw the sweep's results, log them to its parent run and return the exit
    status: ``stop.status`` if it stopped early (:data:`INTERRUPTED`, :data:`RAY_LOST`; then the
    last line says so and how to resume), :data:`UNLOGGED` if MLflow lacks some of it, 1 if a
    trial failed."""
    import analysis
    from sweeps.results import export_parquet, print_results, result_table

    trials_path, epochs_path = export_parquet(sweep, sweep.run_ids)
    rows = [row for phase in sweep.phases for row in result_table(phase)]
    print_results(sweep, rows)
    outputs = analysis.sweep_figure(sweep.script, rows, trials_path, epochs_path, sweep.dir)
    failed = sum(r["status"] == "ERROR" for p in sweep.phases for r in p.records)
    complete = stop is None and all(p.complete for p in sweep.phases)
    parent_error = _log_parent(sweep, [trials_path, epochs_path, *outputs], failed, elapsed,
                               complete, stop.reason if stop else "")
    total = sum(len(p.records) for p in sweep.phases)
    ended = sum(r["status"] in ("TERMINATED", "ERROR") or r["final"] is not None
                for p in sweep.phases for r in p.records)
    counts = f"{total} trials" if complete else f"stopped early: {ended} of {total} started trials ended"
    print(f"\n[{sweep.name}] {counts}, {failed} failed, "
          f"{elapsed:.0f} s. Parquet: {trials_path}, {epochs_path}; outputs: "
          f"{', '.join(map(str, outputs))}; MLflow experiment '{sweep.script}' at "
          f"{sweep.args.tracking_uri}", flush=True)
    resume = f"python sweeps/{sweep.script}.py --resume {sweep.name}"
    if Path(sweep.args.storage_path).expanduser().resolve() != RESULTS / "sweeps":
        resume += f" --storage-path {sweep.args.storage_path}"
    if sweep.unlogged or parent_error:
        reasons = sorted(set(sweep.unlogged.values()) | ({parent_error} if parent_error else set()))
        parts = [f"{len(sweep.unlogged)} of {total} trial runs"] if sweep.unlogged else []
        parts += ["the parent run's results"] if parent_error else []
        print(f"[{sweep.name}] MLflow is incomplete: {' and '.join(parts)} could not be logged to "
              f"{sweep.args.tracking_uri} ({'; '.join(reasons)}). No result is lost: Tune's "
              f"storage and {trials_path.name} hold every trial. Once the server answers, "
              f"back-fill with:  {resume}", flush=True)
        if sweep.unlogged:
            print(f"[{sweep.name}] trials missing from MLflow: {', '.join(sorted(sweep.unlogged))}",
                  flush=True)
    if not complete:
        reason = stop.reason if stop else SweepInterrupted.reason
        print(f"[{sweep.name}] {reason}: the sweep stopped before its end; unfinished trial runs "
              f"are KILLED in MLflow; continue with  {resume}", flush=True)
        return stop.status if stop else INTERRUPTED
    if sweep.unlogged or parent_error:
        return UNLOGGED
    return 1 if failed else 0


def _log_parent(sweep: Sweep, paths: list[Path], failed: int, elapsed: float, complete: bool,
                reason: str = "") -> str:
    """The sweep's files and totals on its parent run (KILLED with ``reason`` if it stopped
    early); the reason if MLflow refused them."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import STOPPED, failure_reason
    client = MlflowClient(sweep.args.tracking_uri)
    try:
        for path in paths:
            client.log_artifact(sweep.parent_run_id, str(path))
        client.log_metric(sweep.parent_run_id, "failed_trials", failed)
        client.log_metric(sweep.parent_run_id, "sweep_wall_time_s", elapsed)
        if reason:
            client.set_tag(sweep.parent_run_id, STOPPED, reason)
        client.set_terminated(sweep.parent_run_id, status="FINISHED" if complete else "KILLED")
    except Exception as err:  # noqa: BLE001 - the results are on disk; report, don't crash
        return failure_reason(err)
    return ""
