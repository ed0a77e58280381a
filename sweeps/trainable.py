"""The Tune trainable: one vpns trial in a Ray worker, its per-epoch reports and checkpoints, and
the artifacts of its final report (masks, layer stats, the prompt as a PNG, the exported model).

Tune pickles :func:`trainable` by reference: this module must import in a Ray worker as
``sweeps.trainable``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune

from search_spaces.points import resolve
from sweeps.flags import METRIC
from sweeps.usage import Usage
from vpns_core.config import Config
from vpns_core.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
NODES = "nodes.txt"  # in every reported checkpoint: the nodes the trial's attempts ran on
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
        _train_on_workers(cfg, scaling)
        return
    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    gpu_ids = ray.get_gpu_ids()  # Ray also set CUDA_VISIBLE_DEVICES to them
    device, fallback = place(cfg.device, gpu_ids, torch.cuda.is_available(), node_id)
    placement = {"node_id": node_id, "gpu_ids": ",".join(map(str, gpu_ids)),
                 "device": device, "device_fallback": fallback, "started_at": _now(), "workers": "1"}
    cap_gpu_memory(context.get_assigned_resources().get("GPU", 0.0), cfg.device)
    # Scratch space outside Tune's trial folder, which Tune copies to storage wholesale; what
    # must survive goes into the reported checkpoints. A leftover of a dead attempt is stale:
    # Tune's latest checkpoint is the truth. Each attempt has its own folder: the worker of a
    # node whose raylet died keeps running its epoch (Ray does not stop it), and where it shares
    # the disk with the retry (nodes on one machine, a shared VPNS_SCRATCH) it must not write
    # into the retry's files.
    folder = Path(os.environ.get("VPNS_SCRATCH", tempfile.gettempdir())) / "vpns-trials" / \
        tune.get_context().get_trial_id()
    shutil.rmtree(folder, ignore_errors=True)
    try:
        _train(cfg, folder / f"{node_id[:8]}-{os.getpid()}", placement)
    finally:  # also when ASHA stops the trial (SystemExit inside tune.report)
        shutil.rmtree(folder, ignore_errors=True)
        if cfg.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # a reused actor's next trial starts with the GPU's memory free


def _train_on_workers(cfg: Config, scaling: "Scaling") -> None:
    from sweeps.data_parallel import run_trial_on_workers

    folder = Path(os.environ.get("VPNS_SCRATCH", tempfile.gettempdir())) / "vpns-trials" / \
        f"{tune.get_context().get_trial_id()}-driver-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        restored = tune.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as saved:
                if (Path(saved) / FINAL).is_file():  # finished before the driver died: report it again
                    _report_final(json.loads((Path(saved) / FINAL).read_text()), Path(saved), folder)
                    return
        run_trial_on_workers(cfg.to_dict(), scaling, {"started_at": _now()}, planned=cfg.total_epochs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _train(cfg: Config, scratch: Path, placement: dict[str, str]) -> None:
    from vpns_core.train import run_trial

    workdir = scratch / "work"
    workdir.mkdir(parents=True)
    planned = cfg.total_epochs  # ASHA never stops a trial at its last epoch
    resume = False
    nodes = [placement["node_id"]]
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            folder = Path(folder)
            if (folder / FINAL).is_file():  # finished before the driver died: report it again
                _report_final(json.loads((folder / FINAL).read_text()), folder, scratch)
                return
            shutil.copyfile(folder / CHECKPOINT, workdir / CHECKPOINT)
            if (folder / NODES).is_file():  # one entry per attempt that reported
                nodes = (folder / NODES).read_text().split(",") + nodes
            resume = True
    placement = {**placement, "nodes": ",".join(nodes)}
    (scratch / NODES).write_text(placement["nodes"])
    usage = Usage(placement["device"])

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="report-") as tmp:
            _link(workdir / CHECKPOINT, Path(tmp) / CHECKPOINT)
            _link(scratch / NODES, Path(tmp) / NODES)
            tune.report({**metrics, **placement, "planned_epochs": planned, "system": usage.sample()},
                        checkpoint=tune.Checkpoint.from_directory(tmp))

    # resume=False without a Tune checkpoint: an epoch Tune never saw must run (and report) again
    result = run_trial(cfg, workdir, reporter=report, resume=resume)
    final = {**result.final, **placement, "ended_at": _now(), "final": 1, "planned_epochs": planned}
    final[METRIC] = final.get("selected_val_acc", final.get(METRIC))  # the selected model's
    write_artifacts(cfg, workdir, scratch / "final", final)
    _link(scratch / NODES, scratch / "final" / NODES)
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
    """Copy masks, layer stats (JSON and CSV), the export and its programs; draw the prompt;
    write final.json."""
    from PIL import Image

    from vpns_core.export import PROGRAM, UNPROMPTED_PROGRAM
    from vpns_core.prompts import build_prompt

    out.mkdir(parents=True, exist_ok=True)
    for name in ("masks.pt", "layer_stats.json", "model_export.pt", PROGRAM, UNPROMPTED_PROGRAM):
        if name == UNPROMPTED_PROGRAM and not (workdir / name).is_file():
            continue  # a trial without a prompt has one program
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
        image = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        pixels = image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
        Image.fromarray(pixels.numpy()).save(out / "prompt.png")  # 8-bit RGB, rounded
    (out / FINAL).write_text(json.dumps(final, indent=1, default=str))
