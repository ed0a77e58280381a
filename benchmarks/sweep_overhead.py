"""Sweep overhead: seconds of Ray Tune + MLflow per trial, for trivial trials.

The same tiny trials (tiny preset shrunk further: 32 training images, one epoch per stage) run
twice in one process, side by side:

- ``direct``: ``run_trial`` in this process, one after another (the trials' own compute);
- ``sweep``: the real sweep machinery (``sweeps.sweep.run_sweep``: Tune trainable, actor
  reuse, checkpoint reports, the MLflow callback with params/metrics/artifacts, the Parquet
  export, the table and the figure), one trial at a time, for ``--trials`` N1 and N2 trials.

The per-trial overhead is the slope ``((sweep(N2) - sweep(N1)) - (direct(N2) - direct(N1))) /
(N2 - N1)``; the intercept is the per-sweep cost (MLflow experiment and parent run, export,
figure). Ray's start is timed on its own (once per sweep); an untimed one-trial sweep first
warms up the driver's imports and Ray's worker process. Target (issue #7): ≤ 1.5 s per trial.

    python -m benchmarks.sweep_overhead                  # 3 and 9 trials
    python -m benchmarks.sweep_overhead --quick          # 2 and 4 trials

Writes ``results/benchmarks/sweep_overhead.json``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import write_json
from sweeps.text_table import print_table

TRIVIAL = {"train_subset": 32, "test_subset": 16, "val_fraction": 0.25, "label_mapping_samples": 16,
           "mask_epochs": 1, "tune_epochs": 1, "batch_size": 16, "eval_batch_size": 64}
TARGET_S = 1.5


def plan(sweep) -> None:
    from search_spaces import base as presets
    sweep.run_phase("trials", {**presets.base("tiny"), **TRIVIAL}, {})  # the grid is the seeds


def run_direct(seeds: list[int], workdir: Path) -> list[float]:
    from search_spaces import base as presets
    from vpns_core.config import Config
    from vpns_core.train import run_trial
    times = []
    for seed in seeds:
        cfg = Config(**{**presets.base("tiny"), **TRIVIAL, "seed": seed, "num_threads": 1, "device": "cpu"})
        t0 = time.perf_counter()
        run_trial(cfg, workdir / f"direct-{seed}")
        times.append(time.perf_counter() - t0)
    return times


def run_sweep_timed(n: int, workdir: Path, tracking: str, concurrent: int) -> float:
    from sweeps.sweep import run_sweep
    argv = ["--preset", "tiny", "--storage-path", str(workdir / "sweeps"), "--tracking-uri", tracking,
            "--name", f"overhead-{n}", "--max-concurrent", str(concurrent), "--cpus-per-trial", "1",
            "--seeds", *map(str, range(n))]
    t0 = time.perf_counter()
    rc = run_sweep("bench_sweep_overhead", plan, argv, search="grid", scheduler="fifo")
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"the sweep of {n} trials exited with {rc}")
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs=2, default=[3, 9], metavar=("N1", "N2"))
    p.add_argument("--concurrent", type=int, default=1, help="trials at once in the sweeps")
    p.add_argument("--quick", action="store_true", help="2 and 4 trials")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.trials = [2, 4]
    n1, n2 = sorted(args.trials)
    if n1 == n2:
        p.error("--trials needs two different counts")
    import ray
    import torch
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        direct = run_direct(list(range(n2)), tmp)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        try:
            # warm-up sweep (untimed): driver imports (MLflow, matplotlib) and Ray's worker process
            run_sweep_timed(1, tmp / "warmup", f"sqlite:///{tmp}/mlflow-warmup.db", args.concurrent)
            sweeps = {}
            for n in (n1, n2):  # a fresh MLflow store each: its creation is part of the intercept
                sweeps[n] = run_sweep_timed(n, tmp / f"s{n}", f"sqlite:///{tmp}/mlflow-{n}.db", args.concurrent)
        finally:
            ray.shutdown()
    d1, d2 = sum(direct[:n1]), sum(direct[:n2])
    per_trial = ((sweeps[n2] - sweeps[n1]) - (d2 - d1) / args.concurrent) / (n2 - n1)
    per_sweep = sweeps[n1] - d1 / args.concurrent - per_trial * n1
    rows = [[n, sweeps[n], sum(direct[:n]), sweeps[n] - sum(direct[:n]) / args.concurrent,
             (sweeps[n] - sum(direct[:n]) / args.concurrent) / n] for n in (n1, n2)]
    print_table(f"sweep overhead (trivial tiny trials, {args.concurrent} at a time; Ray start "
                f"{ray_start:.1f} s once per sweep, not included)",
                ["trials", "sweep s", "direct s", "overhead s", "overhead/trial (incl. fixed)"], rows)
    print(f"\nper trial (slope): {per_trial:.2f} s  (target <= {TARGET_S} s: "
          f"{'ok' if per_trial <= TARGET_S else 'MISS'});  per sweep (intercept): {per_sweep:.1f} s;  "
          f"trial compute: {sum(direct) / len(direct):.2f} s each")
    payload = {"args": vars(args), "ray_start_s": ray_start, "direct_trial_s": direct,
               "sweep_s": {str(k): v for k, v in sweeps.items()}, "overhead_per_trial_s": per_trial,
               "overhead_per_sweep_s": per_sweep, "target_s": TARGET_S}
    write_json("sweep_overhead", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
