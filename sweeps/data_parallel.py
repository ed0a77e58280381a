"""A trial on several workers (``--workers-per-trial N`` > 1): Ray Train inside the Tune trial.

Ray 2.60 runs Ray Train V2 (``RAY_TRAIN_V2_ENABLED`` is on by default), where a ``TorchTrainer``
is launched from inside a Tune function trainable; the old ``Tuner(trainer)`` nesting is gone.
So for N > 1 the trial's Tune function (:func:`sweeps.trainable.trainable`) is the *driver* of
one Ray Train run: it reserves no CPU (a little memory, see :data:`DRIVER_MEMORY`), and the
``TorchTrainer`` starts N workers of ``--cpus-per-trial`` CPUs and ``--gpus-per-trial`` GPUs each,
sets up their process group (gloo on CPUs, NCCL on GPUs) and runs :func:`_worker` on each. Every
worker runs the attempt a one-worker trial runs (:func:`sweeps.attempt.run_attempt`), whose
:func:`vpns_core.train.run_trial` trains data-parallel inside the group (see
:mod:`vpns_core.distributed`); only its channel (:class:`_RankChannel`) differs.

Reports and checkpoints keep their single-worker form, so Tune, the searcher, ASHA, the MLflow
tracker, the Parquet export and ``--resume`` see a trial of N workers exactly like a trial of one:

1. After every epoch all workers call ``ray.train.report``; rank 0 attaches the trial's
   checkpoint, which Ray Train uploads to ``<sweep>/train/<phase>/``.
2. A controller callback (:class:`_Forward`) hands the report and its checkpoint to the driver,
   which reports both to Tune (``tune.report``: Tune keeps its own copy, as for one worker).
3. The driver answers rank 0 (``continue``, or ``stop`` when ASHA stopped the trial); rank 0
   broadcasts the answer, so the workers never train an epoch Tune will not use.

Failures: a worker that dies (``kill -9``, a lost node) fails the Train run at once
(``FailureConfig(max_failures=0)``), so the driver's Tune trial fails and Tune retries it
(``--max-failures``, the same budget as a one-worker trial): the retry starts a new Train run
from the trial's last Tune checkpoint, on any number of workers, and keeps the trial's MLflow
run. One retry budget, counted in one place (``num_failures``), for every N.

Placement groups: a Train run's workers hold a placement group created by its controller, and
Ray removes such a group only once both the controller and the *job* (the sweep) are gone. A
controller killed with its trial (ASHA stops a trial: Tune ends the trial's process at once; a
lost driver node) would leave its workers' CPUs and GPUs reserved for the rest of the sweep, and
the next trials would wait for them for ever. Ray Train's own cleaner asks the state API, which
needs the dashboard the sweeps do not start. So rank 0 writes its group's id next to the run
(:data:`GROUP_FILE`), and :class:`PlacementGroupReaper`, a Tune callback in the sweep's process,
removes the group when the trial ends, fails or is retried (a group already removed is skipped).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.v2._internal.execution.context
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback

from sweeps.attempt import Stopped, run_attempt, scratch_root
from sweeps.placement import this_process
from vpns_core.config import Config

#: rank 0 writes its placement group's id to ``<storage>/<trial id>-<run>`` + this suffix
GROUP_FILE = ".placement_group"
#: logical memory the driver of a data-parallel trial reserves instead of a CPU: a Tune trial must
#: reserve something, and a CPU would leave an N-worker trial on N CPUs unable to start
DRIVER_MEMORY = 256 * 2**20


@dataclass(frozen=True)
class Scaling:
    """How one trial is spread: ``workers`` Ray Train workers of ``cpus`` CPUs and ``gpus`` GPUs
    each, Ray Train's checkpoints under ``storage`` (a folder every node reaches).
    ``state_api``: whether Ray's state API answers (a cluster with a dashboard); without it,
    Ray Train's placement-group cleaner would warn every second (see :class:`_TrialTrainer`)."""

    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    storage: str = ""
    state_api: bool = True

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for the trial: everything for one worker, the driver's share for N."""
        if self.workers == 1:
            return {"cpu": self.cpus, "gpu": self.gpus}
        return {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY}


class _Mailbox:
    """The two channels of one Train run (an async actor owned by the trial's driver, so it dies
    with it): reports (controller to driver) and answers (driver to rank 0)."""

    def __init__(self) -> None:
        self.reports: asyncio.Queue = asyncio.Queue()
        self.answers: asyncio.Queue = asyncio.Queue()

    async def report(self, item) -> None:
        await self.reports.put(item)

    async def next_report(self):
        return await self.reports.get()

    async def answer(self, answer: str) -> None:
        await self.answers.put(answer)

    async def next_answer(self) -> str:
        return await self.answers.get()


class _Forward(UserCallback):
    """Runs in the Train controller: hands each report (rank 0's metrics) and its persisted
    checkpoint to the trial's driver."""

    def __init__(self, mailbox) -> None:
        self.mailbox = mailbox

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        ray.get(self.mailbox.report.remote((metrics[0], checkpoint)))


class _TrialTrainer(TorchTrainer):
    """``TorchTrainer`` without its placement-group cleaner where Ray's state API is absent.

    The cleaner (a detached actor per run) asks the state API every second whether the
    controller lives; a local Ray started without its dashboard (the sweeps' default) has no
    state API, so it logs a warning every second for the whole run. The placement group is
    removed with the controller that created it anyway; the cleaner only guards against a
    controller that dies without removing it."""

    def __init__(self, *args, state_api: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._state_api = state_api

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        callbacks = super()._create_default_callbacks()
        if self._state_api:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]


class PlacementGroupReaper(tune.Callback):
    """Removes the placement groups of a data-parallel trial's Train runs once the trial is done
    with them (see the module docstring). Runs in the sweep's process."""

    def __init__(self, storage: str) -> None:
        self.storage = Path(storage)

    def reap(self, pattern: str = "*") -> int:
        """Remove the groups recorded under ``pattern`` (a trial id, or all); returns how many
        were still held."""
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
        removed = 0
        for record in self.storage.glob(f"{pattern}-*{GROUP_FILE}"):
            try:
                group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record.read_text().strip())))
                if placement_group_table(group).get("state") not in (None, "REMOVED"):
                    remove_placement_group(group)
                    removed += 1
            except (OSError, ValueError):  # unreadable, or removed meanwhile
                pass
            record.unlink(missing_ok=True)
        return removed

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_experiment_end(self, trials, **info) -> None:
        self.reap()


def run_trial_on_workers(config: dict[str, Any], scaling: Scaling, placement: dict[str, str]) -> None:
    """The driver of one data-parallel trial, inside its Tune function: start a Train run from the
    trial's last Tune checkpoint (if any), report each of its reports and checkpoints to Tune,
    and answer each with continue/stop. Raises what failed the run (Tune then retries)."""
    mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
    trial_id = tune.get_context().get_trial_id()
    name = f"{trial_id}-{uuid.uuid4().hex[:8]}"  # one Train run per attempt
    per_worker = {"CPU": scaling.cpus, **({"GPU": scaling.gpus} if scaling.gpus else {})}
    trainer = _TrialTrainer(
        _worker,
        train_loop_config={"config": config, "resume": tune.get_checkpoint(), "mailbox": mailbox,
                           "group_file": str(Path(scaling.storage) / f"{name}{GROUP_FILE}"),
                           "placement": placement, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=scaling.storage, callbacks=[_Forward(mailbox)],
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        state_api=scaling.state_api)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the Tune thread below
            failure.append(err)
        finally:
            mailbox.report.remote(None)

    thread = threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True)
    thread.start()
    try:
        while (item := ray.get(mailbox.next_report.remote())) is not None:
            metrics, persisted = item
            checkpoint = (tune.Checkpoint(persisted.path, persisted.filesystem)
                          if persisted is not None else None)
            try:
                tune.report(metrics, checkpoint=checkpoint)
            except BaseException:  # SystemExit when ASHA stops the trial: stop the workers too
                mailbox.answer.remote("stop")
                thread.join(timeout=120)
                raise
            mailbox.answer.remote("continue")
        thread.join()
        if failure:
            raise failure[0]
    finally:
        shutil.rmtree(Path(scaling.storage) / name, ignore_errors=True)


def _worker(loop: dict[str, Any]) -> None:
    """One rank of a data-parallel trial: the attempt of a one-worker trial
    (:func:`sweeps.attempt.run_attempt`) inside Ray Train's process group; rank 0 reports with
    the checkpoint, the others keep step."""
    from vpns_core.distributed import DataParallel

    # Ray Train logs every report (all its metrics) of every rank and every upload at INFO
    for name in (ray.train.v2._internal.execution.context.__file__, "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = Config.from_dict(loop["config"])
    rank = ray.train.get_context().get_world_rank()
    here = this_process(cfg.device)
    if here["device"] == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())  # this rank's GPU
    dp = DataParallel.current()
    if rank == 0:
        group = ray.util.get_current_placement_group()
        if group is not None:
            Path(loop["group_file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(loop["group_file"]).write_text(group.id.hex())
    nodes = dp.gather(here["node_id"])
    placement = {**loop["placement"], **here, "workers": str(dp.world), "worker_nodes": ",".join(nodes)}
    scratch = scratch_root() / f"{loop['trial_id']}-rank{rank}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run_attempt(cfg, scratch, placement, loop["resume"], _RankChannel(loop["mailbox"], rank))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _RankChannel:
    """How a rank reports (:class:`sweeps.attempt.Channel`): every rank calls
    ``ray.train.report`` (rank 0 with the checkpoint), then rank 0 waits for the driver's answer
    and broadcasts it, so every rank raises :class:`sweeps.attempt.Stopped` when Tune stopped
    the trial."""

    def __init__(self, mailbox, rank: int) -> None:
        self.mailbox = mailbox
        self.main = rank == 0

    def send(self, metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        answer = [ray.get(self.mailbox.next_answer.remote()) if self.main else None]
        torch.distributed.broadcast_object_list(answer, src=0)
        if answer[0] == "stop":
            raise Stopped
