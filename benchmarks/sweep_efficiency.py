"""Sweep efficiency: Optuna + ASHA against the exhaustive grid on the pad-size sweep.

Both are real ``sweeps/ablation_pad.py`` sweeps (Ray Tune + MLflow), run one after the other
in this process (or the grid is read from a finished sweep, ``--grid-dir``):

- ``grid``: every pad (and "no prompt") at the preset's learning rates, FIFO, every trial to the
  end: the figure's own sweep;
- ``optuna+asha``: seeded TPE over the same pad axis (``--search-lr`` adds both learning rates),
  ``--num-samples`` trials, ASHA stopping weak trials at epochs grace·rf^k (never at a trial's
  last epoch), ``--repeats`` TPE seeds.

Compared: the best trial *by validation accuracy* (as a user would pick; never the test set) and
its test accuracy at the validation-selected epoch, and the epochs each sweep trained (sum over
its trials; the ratio optuna ÷ grid). Target (issue #7): within 1 point of the grid's best for
≤ 40% of its epochs.

    python benchmarks/sweep_efficiency.py --preset tiny                     # seconds per trial
    python benchmarks/sweep_efficiency.py                                   # default preset (~10 min grid + ~5 min)
    python benchmarks/sweep_efficiency.py --grid-dir results/sweeps/ablation_pad-default-...   # reuse a grid

Writes ``results/benchmarks/sweep_efficiency.json``; the sweeps themselves land under
``results/benchmarks/sweeps`` (MLflow: ``results/benchmarks/mlflow.db``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.common import RESULTS, print_table, write_json
except ModuleNotFoundError:  # run as a script
    from common import RESULTS, print_table, write_json

TARGET_POINTS, TARGET_EPOCH_RATIO = 1.0, 0.40


def summarise(folder: Path) -> dict[str, Any]:
    """Trials, epochs and the best-by-validation trial of one finished sweep folder."""
    import pyarrow.parquet as pq
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    done = [t for t in trials if t["finished"]]
    best = max(sorted(done, key=lambda t: t["trial_id"]), key=lambda t: t["selected_val_acc"], default=None)
    return {
        "folder": str(folder), "trials": len(trials), "finished": len(done),
        "stopped_early": sum(bool(t["early_stopped"]) for t in trials),
        "failed": sum(t["status"] == "ERROR" for t in trials),
        "epochs": int(sum(t["epochs_done"] or 0 for t in trials)),
        "points": [str(t.get("axis.pad")) for t in trials],
        "best_pad": str(best.get("axis.pad")) if best else None,
        "best_val_acc": best["selected_val_acc"] if best else None,
        "best_test_acc": best["selected_test_acc"] if best else None,
        "best_lrs": ({"mask_lr": best.get("config.mask_lr"), "tune_lr": best.get("config.tune_lr")}
                     if best else None),
        "max_test_acc_any_trial": max((t["selected_test_acc"] for t in done), default=None),
    }


def run(argv: list[str]) -> tuple[Path, float]:
    from sweeps import ablation_pad
    t0 = time.perf_counter()
    rc = ablation_pad.main(argv)
    elapsed = time.perf_counter() - t0
    name = argv[argv.index("--name") + 1]
    folder = Path(argv[argv.index("--storage-path") + 1]) / name
    if rc != 0 or not (folder / "trials.parquet").is_file():
        raise SystemExit(f"sweep {name} exited with {rc}")
    return folder, elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=("default", "tiny", "paper"))
    p.add_argument("--grid-dir", default=None, help="a finished grid sweep of ablation_pad to reuse")
    p.add_argument("--num-samples", type=int, default=4, help="Optuna trials per repeat")
    p.add_argument("--repeats", type=int, default=1, help="Optuna runs with TPE seeds 0, 1, ...")
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=2.0)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--search-lr", action="store_true",
                   help="Optuna also searches both learning rates (default: fixed at the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="passed to both sweeps (e.g. train_subset=500)")
    p.add_argument("--storage-path", default=str(RESULTS / "sweeps"))
    p.add_argument("--tracking-uri", default=f"sqlite:///{RESULTS / 'mlflow.db'}")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import ray

    from search_spaces import pad_size
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["--preset", args.preset, "--storage-path", args.storage_path, "--tracking-uri",
              args.tracking_uri, "--max-concurrent", str(args.max_concurrent)]
    for item in args.set:
        common += ["--set", item]
    from vpns_core.config import Config
    grid_cfg = Config.from_dict(pad_size.base(args.preset))  # the learning rates the grid uses
    fixed_lr = [] if args.search_lr else ["--set", f"mask_lr={grid_cfg.mask_lr}",
                                          "--set", f"tune_lr={grid_cfg.tune_lr}"]
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if args.grid_dir:
            grid_dir, grid_s = Path(args.grid_dir), None
        else:
            grid_dir, grid_s = run([*common, "--search", "grid", "--scheduler", "fifo",
                                    "--name", f"efficiency-grid-{args.preset}-{stamp}"])
        optuna_runs = []
        for seed in range(args.repeats):
            folder, seconds = run([*common, *fixed_lr, "--search", "optuna", "--scheduler", "asha",
                                   "--num-samples", str(args.num_samples), "--optuna-seed", str(seed),
                                   "--grace-period", str(args.grace_period),
                                   "--reduction-factor", str(args.reduction_factor),
                                   "--name", f"efficiency-optuna{seed}-{args.preset}-{stamp}"])
            optuna_runs.append({**summarise(folder), "optuna_seed": seed, "wall_s": seconds})
    finally:
        if own_ray:
            ray.shutdown()

    grid = {**summarise(grid_dir), "wall_s": grid_s}
    rows = [["grid (fifo)", grid["trials"], grid["stopped_early"], grid["epochs"], 1.0, grid["best_pad"],
             grid["best_val_acc"], grid["best_test_acc"], 0.0, grid["wall_s"] or "", ""]]
    for r in optuna_runs:
        r["epoch_ratio"] = r["epochs"] / grid["epochs"]
        r["test_points_vs_grid"] = 100 * (r["best_test_acc"] - grid["best_test_acc"])
        r["meets_target"] = (r["test_points_vs_grid"] >= -TARGET_POINTS and r["epoch_ratio"] <= TARGET_EPOCH_RATIO)
        rows.append([f"optuna+asha (seed {r['optuna_seed']})", r["trials"], r["stopped_early"], r["epochs"],
                     r["epoch_ratio"], r["best_pad"], r["best_val_acc"], r["best_test_acc"],
                     r["test_points_vs_grid"], r["wall_s"], "ok" if r["meets_target"] else "MISS"])
    print_table(f"sweep efficiency: ablation_pad [{args.preset}], best trial chosen on validation; "
                f"target: >= grid - {TARGET_POINTS:g} point with <= {TARGET_EPOCH_RATIO:.0%} of its epochs",
                ["sweep", "trials", "stopped", "epochs", "x grid epochs", "best pad", "val acc",
                 "test acc", "points vs grid", "wall s", ""], rows)
    for r in optuna_runs:
        print(f"optuna seed {r['optuna_seed']} sampled pads: {r['points']}")
    payload = {"args": vars(args), "grid": grid, "optuna_asha": optuna_runs,
               "targets": {"points": TARGET_POINTS, "epoch_ratio": TARGET_EPOCH_RATIO}}
    write_json("sweep_efficiency", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
