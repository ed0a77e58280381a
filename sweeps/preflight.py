"""Checks of a sweep's flags and of what it will reach, run before Ray starts and before anything
is written: a user's mistake costs a few seconds and one line.

Every check raises :class:`UsageError` whose message starts with the flag (or ``--set FIELD``)
and says what is allowed. The network checks (``--address``, ``--tracking-uri``) wait at most
``TIMEOUT`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from sweeps.errors import UsageError
from sweeps.flags import METRIC, MODE

if TYPE_CHECKING:
    from vpns_core.pareto import Budget

TIMEOUT = 3.0  # seconds a network check waits
TRACKING_SCHEMES = ("sqlite", "http", "https", "file")


def check_flags(args: argparse.Namespace) -> None:
    """Numeric flags in their ranges (argparse has checked their types)."""
    def at_least(flag: str, value, low, what: str = "") -> None:
        if value is not None and value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}{what}")
    at_least("--num-samples", args.num_samples, 1)
    at_least("--max-concurrent", args.max_concurrent, 1)
    at_least("--grace-period", args.grace_period, 1, " epoch")
    at_least("--max-failures", args.max_failures, 0)
    if args.reduction_factor <= 1:
        raise UsageError(f"--reduction-factor {args.reduction_factor:g}: must be greater than 1 "
                         f"(ASHA keeps 1/rf of the trials at each rung)")
    if not args.cpus_per_trial > 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: must be greater than 0 "
                         f"(fractions allowed)")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: must be 0 or more (fractions allowed)")
    if args.gpus_per_trial > 1:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: a trial runs on one GPU; use at most 1 "
                         f"(fractions such as 0.5 pack several trials on one GPU), and "
                         f"--workers-per-trial N for a trial on N GPUs")
    workers = getattr(args, "workers_per_trial", 1)
    if workers < 1:
        raise UsageError(f"--workers-per-trial {workers}: must be at least 1 (1: the trial is one "
                         f"process; N > 1: N data-parallel Ray Train workers)")
    if workers > 1 and args.gpus_per_trial not in (0, 1):
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: with --workers-per-trial {workers} "
                         f"each worker takes a whole GPU or none; use 0 or 1")
    for seed in args.seeds or ():
        at_least("--seeds", seed, 0)
    twice = sorted({seed for seed in args.seeds or () if args.seeds.count(seed) > 1})
    if twice:
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: seed {twice[0]} is given twice; "
                         f"a seed is one trial per point, so the same trial would run twice and its "
                         f"spread read as seed noise; give each seed once")
    if args.metric.startswith(("test", "selected_test")):
        raise UsageError(f"--metric {args.metric}: select on validation or training metrics, never on test")


def check_multiobjective(args: argparse.Namespace) -> tuple[tuple[str, ...], "Budget"]:
    """``--objectives`` and ``--budget`` of a Pareto search (``sweeps/pareto.py``), and the shared
    flags it cannot honour: returns the costs to minimise and the budget."""
    from vpns_core.pareto import parse_budget, parse_objectives
    try:
        costs = parse_objectives(args.objectives)
    except ValueError as err:
        raise UsageError(f"--objectives {args.objectives}: {err}") from None
    try:
        budget = parse_budget(args.budget)
    except ValueError as err:
        raise UsageError(f"--budget {','.join(args.budget)}: {err}") from None
    if args.search != "optuna":
        raise UsageError(f"--search {args.search}: this sweep searches the Pareto front with "
                         f"Optuna's multi-objective sampler; use --search optuna (the default)")
    if args.scheduler != "fifo":
        raise UsageError(f"--scheduler {args.scheduler}: ASHA stops trials on one metric; a "
                         f"multi-objective search runs every trial to its end; use --scheduler fifo "
                         f"(the default)")
    if (args.metric, args.mode) != (METRIC, MODE):
        raise UsageError(f"--metric {args.metric} --mode {args.mode}: this sweep maximises the "
                         f"validation accuracy and minimises --objectives; leave --metric and --mode out")
    if "latency_cpu_ms" in (*costs, *dict(budget.limits)) and (args.gpus_per_trial > 0 or args.cpus_per_trial >= 2):
        raise UsageError("--objectives/--budget latency_cpu_ms: a pass's CPU time is its latency only "
                         "at one CPU thread; use it with --cpus-per-trial below 2 and no GPUs, or use latency_ms")
    return costs, budget


def check_local_resources(args: argparse.Namespace) -> None:
    """A local Ray has this machine's CPUs and GPUs: a trial that asks for more would wait for
    ever ("no node can fulfil this request"). A Ray session this process already joined (a
    cluster of several nodes, as in tests/test_multinode.py) is what the sweep runs on: its
    resources count, GPUs a node declares included."""
    ray = sys.modules.get("ray")  # joined only if imported: no import of Ray for a refusal
    if ray is not None and ray.is_initialized():
        check_cluster_resources(args, ray.cluster_resources())
        return
    if args.address:
        return  # a cluster's resources are checked once joined (check_cluster_resources)
    cpus, gpus = os.cpu_count() or 1, 0
    if args.gpus_per_trial > 0:  # torch takes seconds to import: only when GPUs are asked for
        import torch
        gpus = torch.cuda.device_count()
    workers = getattr(args, "workers_per_trial", 1)
    if workers > 1:
        for flag, value, have, what in (("--cpus-per-trial", args.cpus_per_trial, cpus, "CPUs"),
                                        ("--gpus-per-trial", args.gpus_per_trial, gpus, "GPUs")):
            if workers * value > have:
                raise UsageError(f"--workers-per-trial {workers}: {workers} workers x {flag} {value:g} "
                                 f"need {workers * value:g} {what}, this machine has {have}; use at "
                                 f"most {int(have // value) if value else workers} workers, or "
                                 f"--address to join a cluster")
        return
    if args.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: this machine has {cpus} CPUs")
    if args.gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has {gpus} GPUs; "
                         f"use 0, or --address to join a cluster that has them")


def check_cluster_resources(args: argparse.Namespace, resources: dict[str, float]) -> None:
    """Per-trial resources against what the joined cluster has in all."""
    where = f"at {args.address}" if args.address else "this process is connected to"
    workers = getattr(args, "workers_per_trial", 1)
    for flag, key, value in (("--cpus-per-trial", "CPU", args.cpus_per_trial),
                             ("--gpus-per-trial", "GPU", args.gpus_per_trial)):
        have = resources.get(key, 0.0)
        if workers * value > have:
            what = f"--workers-per-trial {workers} x {flag} {value:g}" if workers > 1 else f"{flag} {value:g}"
            raise UsageError(f"{what}: the cluster {where} has {have:g} {key}s in all, so no "
                             f"trial could ever start")


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder at or above ``path``."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_folder(flag: str, value: str, path: str | None = None) -> None:
    """A folder the sweep will write (``path``, default ``value``): an existing folder, or one
    that can be made."""
    path = Path(path or value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: {path} is a file, not a folder")
    base = _writable_ancestor(path)
    if not base.is_dir():
        raise UsageError(f"{flag} {value}: cannot be made ({base} is a file)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: cannot be written ({base} is not writable)")


def check_tracking_uri(uri: str, timeout: float = TIMEOUT) -> None:
    """The MLflow store: a writable (or valid) SQLite file, a folder, or a server that answers."""
    parsed = urlparse(uri)
    if parsed.scheme not in TRACKING_SCHEMES:
        raise UsageError(f"--tracking-uri {uri}: unsupported scheme '{parsed.scheme}'; use "
                         f"sqlite:///PATH, http(s)://HOST:PORT or file:///PATH")
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path)
        if path.is_dir():
            raise UsageError(f"--tracking-uri {uri}: {path} is a folder, not an SQLite file")
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout) as db:
                    db.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.DatabaseError as err:
                raise UsageError(f"--tracking-uri {uri}: {path} is not an SQLite database ({err})") from None
            if not os.access(path, os.W_OK):
                raise UsageError(f"--tracking-uri {uri}: {path} is not writable")
        else:
            check_folder("--tracking-uri", uri, str(path.parent))
        return
    if parsed.scheme == "file":
        check_folder("--tracking-uri", uri, parsed.path)
        return
    try:  # an MLflow server answers /health with OK
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read(64)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UsageError(f"--tracking-uri {uri}: no MLflow server answers there within "
                         f"{timeout:g} s ({reason}); start one with `mlflow server --host "
                         f"{parsed.hostname} --port {parsed.port}` or use sqlite:///PATH") from None


def check_address(address: str | None, timeout: float = TIMEOUT) -> None:
    """A Ray cluster to join: ``auto`` needs one started on this machine; ``host:port`` must
    accept a connection within ``timeout``."""
    if not address:
        return
    if address == "auto":
        if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").is_file():
            return
        raise UsageError("--address auto: no Ray cluster runs on this machine; start one with "
                         "`ray start --head` (or `ray up`), or leave --address out for a local Ray")
    host, sep, port = address.rpartition(":")
    if address.startswith(("ray://", "http://", "https://")) or not sep or not port.isdigit():
        raise UsageError(f"--address {address}: expected HOST:PORT of a Ray head node, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UsageError(f"--address {address}: nothing answers there within {timeout:g} s "
                         f"({err.strerror or err}); is the Ray head node up?") from None


def read_sweep_json(path: Path) -> dict:
    """A sweep's ``sweep.json`` (for ``--resume``), refused with the reason when unreadable."""
    try:
        saved = json.loads(path.read_text())
        saved["args"]  # noqa: B018 - a KeyError below names the damage
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume: {path} is unreadable ({type(err).__name__}: {err}); the "
                         f"sweep cannot be resumed, start it again under another --name") from None
    return saved


def check_set_against_space(overrides: dict, space: dict) -> None:
    """A ``--set FIELD`` of a field the sweep's own space varies, whatever form its axis takes
    (a list of values, named points that set it, a sampled Tune domain), would replace that axis
    and run another experiment than the script's; ``--set seed`` would replace ``--seeds``."""
    if "seed" in overrides:
        raise UsageError("--set seed: the seeds of a sweep are given with --seeds (e.g. --seeds 7 9); "
                         "drop --set seed")
    for axis, values in space.items():
        if isinstance(values, dict):  # named points: {label: {field: value}}
            fields = {k for point in values.values() for k in point}
            shown = f"in its points ({', '.join(map(str, values))})"
        else:
            fields = {axis}
            shown = (f"over {', '.join(map(str, values))}" if isinstance(values, (list, tuple))
                     else "by sampling it")
        clash = sorted(set(overrides) & fields)
        if clash:
            field = clash[0]
            what = "" if field == axis else f" (axis '{axis}')"
            raise UsageError(f"--set {field}: this sweep varies {field}{what} {shown}; a --set would "
                             f"replace that axis and run another experiment; drop --set {field} "
                             f"(or run a single trial: python -m vpns_core)")
