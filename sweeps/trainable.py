"""The Tune trainable: one vpns trial in a Ray worker. A trial of one process runs its attempt
(:func:`sweeps.attempt.run_attempt`) here; a trial of N workers is driven from here
(:mod:`sweeps.data_parallel`), and each of its ranks runs the same attempt.

Tune pickles :func:`trainable` by reference: this module must import in a Ray worker as
``sweeps.trainable``.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune

from search_spaces.points import resolve
from sweeps.attempt import TuneChannel, report_again, run_attempt, scratch_root
from sweeps.placement import cap_gpu_memory, now, this_process
from vpns_core.config import Config

if TYPE_CHECKING:  # pragma: no cover
    from sweeps.data_parallel import Scaling


def trainable(config: dict[str, Any], points: dict[str, dict] | None = None,
              scaling: "Scaling | None" = None) -> None:
    """One vpns trial under Tune: report every epoch with the trial's checkpoint, resume from
    ``tune.get_checkpoint()``, and end with one ``final`` report carrying the selected
    accuracies and the artifacts (masks, layer stats, prompt PNG, exported model). With
    ``scaling.workers`` > 1 the trial runs on that many Ray Train workers
    (:mod:`sweeps.data_parallel`) and this function is their driver."""
    cfg = Config.from_dict(resolve(config, points))
    if scaling is not None and scaling.workers > 1:
        _drive_workers(cfg, scaling)
        return
    placement = {**this_process(cfg.device), "started_at": now(), "workers": "1"}
    cap_gpu_memory(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0), cfg.device)
    # A leftover of a dead attempt is stale: Tune's latest checkpoint is the truth. Each attempt
    # has its own folder: the worker of a node whose raylet died keeps running its epoch (Ray
    # does not stop it), and where it shares the disk with the retry (nodes on one machine, a
    # shared VPNS_SCRATCH) it must not write into the retry's files.
    folder = scratch_root() / tune.get_context().get_trial_id()
    shutil.rmtree(folder, ignore_errors=True)
    scratch = folder / f"{placement['node_id'][:8]}-{os.getpid()}"
    channel = TuneChannel()
    try:
        scratch.mkdir(parents=True)
        restored = tune.get_checkpoint()
        if not report_again(restored, scratch, channel):
            run_attempt(cfg, scratch, placement, restored, channel)
    finally:  # also when ASHA stops the trial (SystemExit inside tune.report)
        shutil.rmtree(folder, ignore_errors=True)
        if cfg.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # a reused actor's next trial starts with the GPU's memory free


def _drive_workers(cfg: Config, scaling: "Scaling") -> None:
    from sweeps.data_parallel import run_trial_on_workers

    scratch = scratch_root() / f"{tune.get_context().get_trial_id()}-driver-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if not report_again(tune.get_checkpoint(), scratch, TuneChannel()):
            run_trial_on_workers(cfg.to_dict(), scaling, {"started_at": now()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
