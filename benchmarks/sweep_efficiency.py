"""Sweep efficiency: Optuna + ASHA against the exhaustive grid on the pad-size sweep.

Both are real ``sweeps/ablation_pad.py`` sweeps (Ray Tune + MLflow), run one after the other
in this process (or read from finished sweeps, ``--grid-dir`` / ``--optuna-dir``):

- ``grid``: every pad (and "no prompt") at the preset's learning rates, FIFO, every trial to the
  end: the figure's own sweep;
- ``optuna+asha``: the same pad axis at the same learning rates, ``--num-samples`` distinct pads
  in a seeded random order (Optuna's grid sampler: TPE's random start-up draws repeated pads,
  and a repeated pad repeats a seeded trial exactly), ASHA stopping weak trials at epochs
  grace·rf^k (never at a trial's last epoch), ``--repeats`` sampler seeds; ``--search-lr``
  searches both learning rates too, with TPE.

Compared: the best trial *by validation accuracy* (as a user would pick; never the test set) and
its test accuracy at the validation-selected epoch, and the epochs each sweep trained (sum over
its trials; the ratio optuna ÷ grid). Target (issue #7): within 1 point of the grid's best for
≤ 40% of its epochs.

One run depends on the order the sampler draws the pads in: Ray's ASHA lets a trial go on
whenever its rung holds nothing better yet, so the first trial always trains to the end. At
fixed learning rates every Optuna trial repeats one of the grid's trials exactly (seeded), so the
benchmark also *replays* the sweep's own ``StageASHA`` on the grid's measured validation curves
over every order of n distinct pads (table "replay"), and checks each real run against the
replay of its own order.

    python -m benchmarks.sweep_efficiency --preset tiny          # seconds per trial
    python -m benchmarks.sweep_efficiency                        # default preset: ~20 min grid + 3 x ~7 min
    python -m benchmarks.sweep_efficiency --grid-dir results/benchmarks/sweeps/efficiency-grid-default-<time>

Writes ``results/benchmarks/sweep_efficiency.json``; the sweeps themselves land under
``results/benchmarks/sweeps`` (MLflow: ``results/benchmarks/mlflow.db``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, write_json
from sweeps.text_table import print_table

TARGET_POINTS, TARGET_EPOCH_RATIO = 1.0, 0.40


def started(folder: Path, trial_id: str) -> float:
    """When a trial started: its first report's timestamp less its running time (Optuna's trial
    ids are random, so they do not give the order the trials ran in)."""
    with open(folder / "trials" / f"trial_{trial_id}" / "result.json") as f:
        first = json.loads(f.readline())
    return first["timestamp"] - first["time_total_s"]


def summarise(folder: Path) -> dict[str, Any]:
    """Trials, epochs and the best-by-validation trial of one finished sweep folder."""
    import pyarrow.parquet as pq
    trials = sorted(pq.read_table(folder / "trials.parquet").to_pylist(),
                    key=lambda t: started(folder, t["trial_id"]))
    done = [t for t in trials if t["finished"]]
    ran = json.loads((folder / "sweep.json").read_text())["args"]
    best = max(done, key=lambda t: t["selected_val_acc"], default=None)  # ties: the first started
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
        **{k: ran[k] for k in ("optuna_seed", "num_samples", "grace_period", "reduction_factor",
                               "max_concurrent")},
    }


def grid_curves(folder: Path) -> dict[str, dict[str, Any]]:
    """Per grid point: its validation curve (one value per epoch) and its selected accuracies."""
    import pyarrow.parquet as pq
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    epochs = pq.read_table(folder / "epochs.parquet").to_pylist()
    out = {}
    for t in trials:
        rows = sorted((e for e in epochs if e["trial_id"] == t["trial_id"]), key=lambda e: e["epoch"])
        out[str(t["axis.pad"])] = {"val": [e["val_acc"] for e in rows], "sel_val": t["selected_val_acc"],
                                   "sel_test": t["selected_test_acc"]}
    return out


def replay_order(curves: dict[str, dict[str, Any]], order: list[str], grace: int, rf: float,
                 concurrency: int, rng) -> tuple[int, str]:
    """One Optuna+ASHA sweep replayed on measured curves: ``order`` is the sampler's draw, the
    sweep's own ``StageASHA`` decides after every epoch, ``concurrency`` trials train side by side
    at the same pace (their reports at one epoch arrive in ``rng``'s order, as Ray's would in
    any order). Returns the epochs trained and the best finished point by validation."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from sweeps.schedulers import StageASHA
    planned = max(len(c["val"]) for c in curves.values())
    asha = StageASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=planned,
                     grace_period=grace, reduction_factor=rf)
    queue, running, finished, epochs = list(order), [], [], 0
    while queue or running:
        while queue and len(running) < concurrency:
            trial = SimpleNamespace(trial_id=str(len(order) - len(queue)), point=queue.pop(0), epoch=0)
            asha.on_trial_add(None, trial)
            running.append(trial)
        rng.shuffle(running)
        still = []
        for trial in running:
            trial.epoch += 1
            epochs += 1
            val = curves[trial.point]["val"][trial.epoch - 1]
            decision = asha.on_trial_result(None, trial, {"epoch": trial.epoch, "val_acc": val,
                                                          "planned_epochs": planned})
            if trial.epoch == planned:
                finished.append((int(trial.trial_id), trial.point))
            elif decision != TrialScheduler.STOP:
                still.append(trial)
        running = still
    # ties go to the trial that started first, as in summarise()
    best = max(sorted(finished), key=lambda started: curves[started[1]]["sel_val"])[1]
    return epochs, best


def replay(curves: dict[str, dict[str, Any]], num_samples: int, grace: int, rf: float,
           concurrency: int, draws: int = 4) -> dict[str, Any]:
    """Every order a without-replacement sampler can draw ``num_samples`` points in, each with
    ``draws`` random report orders: the share of sweeps meeting the target, and the mean and
    worst epoch ratio. The training is seeded, so a real run's trials repeat the grid's own
    curves exactly (the benchmark checks its runs against this)."""
    grid_epochs = sum(len(c["val"]) for c in curves.values())
    grid_best = curves[max(sorted(curves), key=lambda p: curves[p]["sel_val"])]["sel_test"]
    outcomes = []
    for order in itertools.permutations(sorted(curves), num_samples):
        for draw in range(draws):
            epochs, best = replay_order(curves, list(order), grace, rf, concurrency, random.Random(draw))
            points = 100 * (curves[best]["sel_test"] - grid_best)
            outcomes.append((epochs / grid_epochs, points))
    n = len(outcomes)
    return {"num_samples": num_samples, "grace_period": grace, "reduction_factor": rf, "sweeps": n,
            "mean_epoch_ratio": sum(r for r, _ in outcomes) / n, "max_epoch_ratio": max(r for r, _ in outcomes),
            "mean_points": sum(p for _, p in outcomes) / n,
            "share_points_ok": sum(p >= -TARGET_POINTS for _, p in outcomes) / n,
            "share_epochs_ok": sum(r <= TARGET_EPOCH_RATIO + 1e-9 for r, _ in outcomes) / n,
            "share_target_met": sum(p >= -TARGET_POINTS and r <= TARGET_EPOCH_RATIO + 1e-9
                                    for r, p in outcomes) / n}


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
    p.add_argument("--optuna-dir", action="append", default=[],
                   help="a finished Optuna sweep to compare instead of running --repeats new ones (repeatable)")
    p.add_argument("--num-samples", type=int, default=3, help="Optuna trials per repeat")
    p.add_argument("--repeats", type=int, default=3, help="Optuna runs with sampler seeds 0, 1, ...")
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--search-lr", action="store_true",
                   help="Optuna also searches both learning rates (default: fixed at the grid's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="passed to both sweeps (e.g. train_subset=500)")
    p.add_argument("--storage-path", default=str(RESULTS / "sweeps"))
    p.add_argument("--tracking-uri", default=f"sqlite:///{RESULTS / 'mlflow.db'}")
    p.add_argument("--replay-grace", type=int, nargs="+", default=[1, 2],
                   help="grace periods of the replay table")
    p.add_argument("--replay-rf", type=float, nargs="+", default=[2.0, 3.0, 4.0],
                   help="reduction factors of the replay table")
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
    own_ray = not ray.is_initialized() and not (args.grid_dir and args.optuna_dir)
    if own_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        if args.grid_dir:
            grid_dir, grid_s = Path(args.grid_dir), None
        else:
            grid_dir, grid_s = run([*common, "--search", "grid", "--scheduler", "fifo",
                                    "--name", f"efficiency-grid-{args.preset}-{stamp}"])
        optuna_runs = [{**summarise(Path(d)), "wall_s": None} for d in args.optuna_dir]
        for seed in range(0 if args.optuna_dir else args.repeats):
            folder, seconds = run([*common, *fixed_lr, "--search", "optuna", "--scheduler", "asha",
                                   "--num-samples", str(args.num_samples), "--optuna-seed", str(seed),
                                   "--grace-period", str(args.grace_period),
                                   "--reduction-factor", str(args.reduction_factor),
                                   "--name", f"efficiency-optuna{seed}-{args.preset}-{stamp}"])
            optuna_runs.append({**summarise(folder), "wall_s": seconds})
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
                     r["test_points_vs_grid"], r["wall_s"] or "", "ok" if r["meets_target"] else "MISS"])
    print_table(f"sweep efficiency: ablation_pad [{args.preset}], best trial chosen on validation; "
                f"target: >= grid - {TARGET_POINTS:g} point with <= {TARGET_EPOCH_RATIO:.0%} of its epochs",
                ["sweep", "trials", "stopped", "epochs", "x grid epochs", "best pad", "val acc",
                 "test acc", "points vs grid", "wall s", ""], rows)
    for r in optuna_runs:
        print(f"optuna seed {r['optuna_seed']} sampled pads: {r['points']}")
    replays = []
    if not args.search_lr:  # fixed learning rates: every Optuna trial is one of the grid's trials
        curves = grid_curves(grid_dir)
        for r in optuna_runs:
            seen = {replay_order(curves, r["points"], r["grace_period"], r["reduction_factor"],
                                 r["max_concurrent"], random.Random(draw)) for draw in range(8)}
            r["replay_outcomes"] = sorted(seen)
            r["replay_matches"] = (r["epochs"], r["best_pad"]) in seen
            print(f"optuna seed {r['optuna_seed']}: replay of its order on the grid's curves gives "
                  f"(epochs, best pad) in {sorted(seen)}; the run: ({r['epochs']}, {r['best_pad']})"
                  f" -> {'matches' if r['replay_matches'] else 'DIFFERS'}")
        for n in range(2, len(curves) + 1):
            for grace in args.replay_grace:
                for rf in args.replay_rf:
                    replays.append(replay(curves, n, grace, rf, args.max_concurrent))
        print_table("replay: Ray's ASHA (StageASHA) on the grid's measured validation curves, every "
                    f"order of n distinct points, {args.max_concurrent} trials side by side",
                    ["n", "grace", "rf", "sweeps", "mean x grid epochs", "worst x", "mean points",
                     "share points ok", "share epochs ok", "share target met"],
                    [[x["num_samples"], x["grace_period"], x["reduction_factor"], x["sweeps"],
                      x["mean_epoch_ratio"], x["max_epoch_ratio"], x["mean_points"], x["share_points_ok"],
                      x["share_epochs_ok"], x["share_target_met"]] for x in replays])
    payload = {"args": vars(args), "grid": grid, "optuna_asha": optuna_runs, "replay": replays,
               "targets": {"points": TARGET_POINTS, "epoch_ratio": TARGET_EPOCH_RATIO}}
    write_json("sweep_efficiency", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
