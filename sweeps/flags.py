"""The flags every sweep script shares: the parser, ``--set FIELD=VALUE`` overrides, the flags
that define a sweep (``--resume`` takes them from its sweep.json) and the per-trial runtime they
imply. No Ray, Optuna or MLflow here: a flag is checked before any of them starts.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import search_spaces
from sweeps import gpus
from sweeps.errors import UsageError
from vpns_core.files import CheckpointError
from vpns_core.config import Config, ConfigError
from vpns_core.registry import UnknownNameError

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("VPNS_RESULTS", PROJECT / "results")).resolve()
METRIC, MODE = "val_acc", "max"  # never the test set: Optuna and ASHA select on validation
# Flags that define a sweep: ``--resume`` takes them from sweep.json, not from the command line.
DEFINING = ("preset", "search", "scheduler", "num_samples", "seeds", "set", "data_root",
            "grace_period", "reduction_factor", "optuna_seed", "metric", "mode", "tracking_uri",
            "log_model", "download")
#: what a user's mistake raises before anything runs: one line on stderr, exit status 2
USER_ERRORS = (UsageError, ConfigError, UnknownNameError, FileNotFoundError, CheckpointError)


def build_parser(script: str, doc: str | None, search: str, scheduler: str,
                 num_samples: int) -> argparse.ArgumentParser:
    searched = {"optuna": "Optuna (TPE) over the space and both learning rates",
                "grid": "every point of the space (the figure's grid)"}[search]
    epilog = f"By default: {searched}{', ASHA stopping weak trials early' if scheduler == 'asha' else ''}."
    if search != "grid":
        epilog += "\n--search grid --scheduler fifo runs every point of the space at the preset's rates."
    p = argparse.ArgumentParser(prog=f"python sweeps/{script}.py", description=doc, epilog=epilog,
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
    add("--workers-per-trial", type=int, default=int(os.environ.get("VPNS_WORKERS_PER_TRIAL", 1)),
        help="data-parallel workers per trial (Ray Train; default $VPNS_WORKERS_PER_TRIAL or 1): "
             "each trial trains on N processes at the same global batch; --cpus-per-trial and "
             "--gpus-per-trial are then per worker. A resumed sweep may change it")
    add("--cpus-per-trial", type=float, default=float(os.environ.get("VPNS_CPUS_PER_TRIAL", 1)),
        help="CPUs per trial (per worker with --workers-per-trial), fractions allowed "
             "(default $VPNS_CPUS_PER_TRIAL or 1)")
    gpus = os.environ.get("VPNS_GPUS_PER_TRIAL")
    add("--gpus-per-trial", type=float, default=float(gpus) if gpus else None,
        help="GPUs per trial (per worker with --workers-per-trial: 0 or 1), fractions such as 0.5 "
             "pack small trials on one GPU (default $VPNS_GPUS_PER_TRIAL, else 1 when this machine "
             "has an NVIDIA GPU and the sweep runs on it, 0 otherwise and with --address)")
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


def runtime_fields(args: argparse.Namespace, preset_workers: int | None = None) -> dict[str, Any]:
    """Per-trial runtime: one torch thread per reserved CPU (oversubscribed threads are up to
    60x slower when trials share cores), CUDA when GPUs are reserved, never download in a trial,
    and no more data-loading workers than the reserved CPUs leave beside the training process
    (the preset's count at most; a preset without one: the trial's automatic count, which is
    that many for splits read from files and none for splits in memory)."""
    threads = max(1, math.floor(args.cpus_per_trial))
    workers = None if preset_workers is None else min(preset_workers, threads - 1)
    return {"num_threads": threads, "device": "cuda" if args.gpus_per_trial > 0 else "cpu",
            "download": False, "num_workers": workers}


def resolve_gpus_per_trial(args: argparse.Namespace) -> None:
    """Fill in ``--gpus-per-trial`` when neither the flag nor ``$VPNS_GPUS_PER_TRIAL`` gave it:
    one GPU per trial on a machine that has one (:func:`sweeps.gpus.local_gpus`), none
    without. With ``--address`` the trials run on the cluster's nodes, not here: 0, as the
    cluster's own setup says otherwise (``VPNS_GPUS_PER_TRIAL`` in ``cluster/cluster.yaml``)."""
    if args.gpus_per_trial is None:
        args.gpus_per_trial = 1.0 if not args.address and gpus.local_gpus() > 0 else 0.0


def trials_on(args: argparse.Namespace) -> str:
    """Where the trials train, for the sweep's first line: ``trials on cuda (1 GPU each)``,
    ``trials on cpu``, ``trials on cuda (2 workers of 1 GPU each)``. ``--set device=...``
    has the last word, as in the trials' configs."""
    device = parse_overrides(args.set).get("device", runtime_fields(args)["device"])
    workers = getattr(args, "workers_per_trial", 1)
    each = f"{args.gpus_per_trial:g} GPU each" if args.gpus_per_trial > 0 else ""
    if workers > 1:
        each = f"{workers} workers" + (f" of {each}" if each else "")
    device = "cuda where usable, else cpu (device=auto)" if device == "auto" else device
    return f"trials on {device}" + (f" ({each})" if each else "")
