"""Shared bits of the benchmarks: the machine they ran on, median timing, tables, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "results" / "benchmarks"
if str(PROJECT) not in sys.path:  # `python benchmarks/x.py` from the repo root
    sys.path.insert(0, str(PROJECT))


def machine() -> dict[str, Any]:
    """What the figures came from: CPU, cores, load, torch and GPU."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": _git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return info


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved_medians(fns: dict[str, Callable[[], None]], warmup: int, iters: int,
                        sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Time every function ``iters`` times, round-robin (so load changes hit all alike), after
    ``warmup`` untimed calls each. Per function: median and quartiles of the wall time
    (``median_s``...) and of the process CPU time (``cpu_median_s``...). On a CPU shared with
    other jobs the CPU time is the steadier measure: it leaves out the time this process waited
    for a core (with one torch thread it is the work done)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {**summary(wall[name]), **{f"cpu_{k}": v for k, v in summary(cpu[name]).items()
                                             if k != "n"}} for name in fns}


def summary(ts: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "n": len(ts)}


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """``results/benchmarks/<name>.json`` (or ``out``), with the machine description added."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=1,
                               default=str))
    print(f"\nwrote {path}")
    return path


def amp_dtype(enabled: bool, device) -> "torch.dtype | None":
    """The autocast dtype a benchmark's ``--amp`` stands for: the trial's own on CUDA
    (:func:`vpns_core.train.amp_dtype`), bf16 on a CPU. None without ``--amp``."""
    import torch
    from vpns_core.train import amp_dtype as trial_amp_dtype
    if not enabled:
        return None
    device = torch.device(device)
    return trial_amp_dtype(device) if device.type == "cuda" else torch.bfloat16
