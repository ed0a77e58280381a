"""Compare a sweep with a rerun of it: the same points and seeds, run again (on another machine,
with another thread count, or with other kernels).

    python -m analysis.rerun results/sweeps/A/trials.parquet results/sweeps/B/trials.parquet

For every (point, seed) finished in both, the difference of the selected test accuracy; per point,
the rerun against the first run paired by seed (:func:`vpns_core.stats.paired`: 95% t-interval,
Holm over the points); overall, the largest and the median per-trial difference. Writes nothing;
prints a table and returns 0 when no point moved by a resolved amount, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

from vpns_core.stats import mean_std, paired

from .runs import read_parquet

METRICS = ("selected_test_acc", "selected_test_acc_prompt", "selected_test_acc_noprompt")


def point_columns(trials: pd.DataFrame) -> list[str]:
    """The sweep's axes other than the seed (``phase`` too, when a sweep has several)."""
    axes = sorted(c for c in trials.columns if c.startswith("axis.") and c != "axis.seed")
    return (["phase"] if trials["phase"].nunique() > 1 else []) + axes


def compare(first: pd.DataFrame, rerun: pd.DataFrame, metric: str = "selected_test_acc") -> dict:
    """Per-trial differences and per-point agreement of ``metric`` (in points of %).

    Returns ``{"pairs": [...], "points": [...], "max_diff", "median_diff", "within": bool}``: a
    pair per (point, seed) finished in both runs, a row per point with both runs' mean ± std over
    seeds and the paired comparison of the rerun against the first run (``within``: its
    Holm-corrected interval contains zero, i.e. no resolved shift).
    """
    keys = point_columns(first)
    done = [t[t["finished"].astype(bool)].copy() for t in (first, rerun)]
    for t in done:
        t["_point"] = t[keys].astype(str).agg(" ".join, axis=1) if keys else "all"
        t["_value"] = 100.0 * t[metric].astype(float)
    a = done[0].set_index(["_point", "config.seed"])["_value"]
    b = done[1].set_index(["_point", "config.seed"])["_value"]
    common = a.index.intersection(b.index)
    pairs = [{"point": p, "seed": int(s), "first": a[(p, s)], "rerun": b[(p, s)],
              "diff": b[(p, s)] - a[(p, s)]} for p, s in common]
    points, values, names = [], {}, []
    for p in dict.fromkeys(done[0]["_point"]):
        va = done[0].loc[done[0]["_point"] == p, "_value"].tolist()
        vb = done[1].loc[done[1]["_point"] == p, "_value"].tolist()
        if not va or not vb:
            continue
        (mean_a, std_a, _), (mean_b, std_b, _) = mean_std(va), mean_std(vb)
        points.append({"point": p, "first_mean": mean_a, "first_std": std_a, "rerun_mean": mean_b,
                       "rerun_std": std_b})
        values[("rerun", p)] = {s: b[(q, s)] for q, s in common if q == p}
        values[("first", p)] = {s: a[(q, s)] for q, s in common if q == p}
        names.append(p)
    tests = paired(values, [(("rerun", p), ("first", p)) for p in names])
    for row, test in zip(points, tests):
        row["test"] = test
        row["within"] = test.verdict != "resolved"
    diffs = [abs(x["diff"]) for x in pairs]
    return {"pairs": pairs, "points": points, "max_diff": max(diffs, default=math.nan),
            "median_diff": statistics.median(diffs) if diffs else math.nan,
            "identical": sum(d == 0 for d in diffs),
            "within": bool(points) and all(r["within"] for r in points)}


def report(result: dict, metric: str) -> str:
    lines = [f"{metric} (test accuracy in %, at the validation-selected epoch)",
             f"{'point':30s} {'first mean ± std':>18s} {'rerun mean ± std':>18s}  rerun − first, paired by seed"]
    for r in result["points"]:
        t = r["test"]
        shift = (f"{t.diff:+.1f} [{t.low:+.1f}, {t.high:+.1f}]: {t.verdict}" if t.verdict != "not tested"
                 else f"{t.diff:+.1f}: not tested ({t.n} paired seeds)")
        lines.append(f"{r['point']:30s} {r['first_mean']:8.1f} ± {r['first_std']:5.1f}    "
                     f"{r['rerun_mean']:8.1f} ± {r['rerun_std']:5.1f}  {shift}")
    lines.append(f"{'point':30s} {'seed':>5s} {'first':>7s} {'rerun':>7s} {'diff':>7s}")
    for p in result["pairs"]:
        lines.append(f"{p['point']:30s} {p['seed']:5d} {p['first']:7.1f} {p['rerun']:7.1f} {p['diff']:+7.1f}")
    lines.append(f"same (point, seed) in both: {len(result['pairs'])}, of which bit-identical "
                 f"{result['identical']}; |difference| median {result['median_diff']:.1f}, "
                 f"largest {result['max_diff']:.1f} points")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.rerun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="trials.parquet of the first run")
    parser.add_argument("rerun", help="trials.parquet of the rerun")
    parser.add_argument("--metric", choices=METRICS, default="selected_test_acc")
    args = parser.parse_args(argv)
    for path in (args.first, args.rerun):
        if not Path(path).is_file():
            print(f"error: {path}: no such trials.parquet", file=sys.stderr)
            return 2
    result = compare(read_parquet(args.first).trials, read_parquet(args.rerun).trials, args.metric)
    if not result["pairs"]:
        print("error: the two runs share no finished (point, seed)", file=sys.stderr)
        return 2
    print(report(result, args.metric))
    return 0 if result["within"] else 1


if __name__ == "__main__":
    sys.exit(main())
