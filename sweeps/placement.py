"""Where and on what a trial's process runs: its node, its GPUs, the device it trains on (and why
not the GPU Ray gave it), and the share of a GPU's memory it may take. Reported with every epoch
(:data:`PLACEMENT`); used by the one-process trainable and by every rank of a data-parallel trial.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timezone

import ray
import torch

from vpns_core.errors import ConfigError

#: Where and on what a trial ran, in every report (strings): trial columns in trials.parquet and
#: tags of its MLflow run. ``hostname`` is Tune's own (it fills it into every result); ``nodes``
#: lists the node of every attempt in order, so a trial resumed elsewhere names both; the others
#: are the last attempt's. ``device_fallback`` is empty unless a trial was given a GPU it could
#: not use (see :func:`place`). ``workers`` is the number of data-parallel workers of the last
#: attempt; for more than one, the node, GPUs and device are rank 0's and ``worker_nodes`` lists
#: every rank's node (``sweeps/data_parallel.py``).
PLACEMENT = ("node_id", "hostname", "nodes", "gpu_ids", "device", "device_fallback",
             "started_at", "ended_at", "workers", "worker_nodes")

log = logging.getLogger(__name__)


def now() -> str:
    """The time of ``started_at`` and ``ended_at``: UTC, ISO 8601."""
    return datetime.now(timezone.utc).isoformat()


def this_process(device: str) -> dict[str, str]:
    """This Ray worker's ``node_id``, ``gpu_ids`` (Ray also set ``CUDA_VISIBLE_DEVICES`` to them),
    and the ``device`` and ``device_fallback`` of :func:`place` for the trial's ``device``."""
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = ray.get_gpu_ids()
    device, fallback = place(device, gpu_ids, torch.cuda.is_available(), node_id)
    return {"node_id": node_id, "gpu_ids": ",".join(map(str, gpu_ids)), "device": device,
            "device_fallback": fallback}


def cap_gpu_memory(share: float, device: str) -> float | None:
    """Trials that share a GPU (``--gpus-per-trial 0.5``) each get at most their share of its
    memory, so one trial cannot starve the other into out-of-memory errors. Returns the cap."""
    if not 0 < share < 1 or device == "cpu" or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(share)
    return share


def place(device: str, gpu_ids: list, cuda: bool, node_id: str = "") -> tuple[str, str]:
    """The device a trial trains on, and why it is not the GPU Ray gave it (else ``""``).

    A trial that Ray gave GPUs (``--gpus-per-trial``) on a node where CUDA is absent (a node that
    declares GPUs it lacks, a driver too old for this torch build): with ``device="cuda"``, what a
    sweep with ``--gpus-per-trial`` sets, it is refused here, at its start, before any data is
    read; with ``device="auto"`` (``--set device=auto``) it trains on the CPU after a logged
    warning, and the reason is reported (``device_fallback``, an MLflow tag and a trial column).

    Raises:
        ConfigError: ``device`` is ``cuda``, Ray assigned GPUs and CUDA is not available.
    """
    if not gpu_ids or cuda or device == "cpu":  # "cpu": asked for, whatever Ray reserved
        return (("cuda" if cuda else "cpu") if device == "auto" else device), ""
    why = (f"Ray assigned GPU {','.join(map(str, gpu_ids))} to this trial on node {node_id} "
           f"({socket.gethostname()}), but CUDA is not available there (torch {torch.__version__}, "
           f"CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): the node declares GPUs it does "
           f"not have, or its NVIDIA driver is too old for this torch build")
    if device == "cuda":
        raise ConfigError(f"device: {why}. Fix the node, or train on the CPU: --gpus-per-trial 0, "
                          f"or --set device=auto to fall back to the CPU with a warning")
    log.warning("GPU FALLBACK: %s; this trial trains on the CPU (--set device=auto)", why)
    return "cpu", why
