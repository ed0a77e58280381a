"""What every benchmark uses: the machine it ran on, interleaved median timing, the JSON output
and the AMP dtype of ``--amp``. Tables are printed with :func:`sweeps.text_table.print_table`."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeps.code_version import git_commit

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "results" / "benchmarks"


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
            "git_commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return info


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
