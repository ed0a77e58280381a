"""Structured (channel) pruning: accuracy, measured inference speed-up and memory against channel
sparsity, per method (VPNs at channel level, Network Slimming, DepGraph).

Structured pruning is not in ``vpns_core`` yet. This figure reads the trial columns below (the
first one present of each list), so a structured method only has to report them in its epoch
metrics (exported as ``last.<name>``) or as final metrics; the accuracies are the usual ones.
"""
from __future__ import annotations

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, Line, Panel, context, draw,
                       has, marker_note, status_note)
from .runs import Runs, aggregate
from .sparsity_curves import METHOD_ORDER, method_name

NAME = "structured"
TITLE = "Structured (channel) pruning"
COLUMNS = {"speedup": ("speedup", "last.speedup", "last.inference_speedup"),
           "memory_mb": ("memory_mb", "last.memory_mb", "last.peak_memory_mb"),
           "flops_g": ("flops_g", "last.flops_g", "last.inference_gflops")}
PANELS = [Panel("tested with prompt", [Line("test_prompt_pct", "")]),
          Panel("tested without prompt", [Line("test_noprompt_pct", "")]),
          Panel("inference speed-up", [Line("speedup", "")], "speed-up over dense (×)", from_zero=True),
          Panel("inference memory", [Line("memory_mb", "")], "peak memory (MB)", from_zero=True),
          Panel("inference FLOPs", [Line("flops_g", "")], "FLOPs per image (GFLOPs)", from_zero=True)]


def _column(runs: Runs, name: str) -> str | None:
    return next((c for c in COLUMNS[name] if c in runs.trials), None)


def applicable(runs: Runs) -> bool:
    return _column(runs, "speedup") is not None


def build(runs: Runs) -> Figure:
    trials = runs.trials
    metrics = {**{k: v for k, v in ACCURACY.items() if k.startswith("test_")},
               **{name: (_column(runs, name), 1.0) for name in COLUMNS if _column(runs, name)}}
    table = aggregate(trials, ["config.method", "config.sparsity"], metrics)
    table["sparsity_pct"] = 100 * table["config.sparsity"]
    caption = [f"{context(runs, trials, sparsity=False)}.", ACCURACY_NOTE,
               "Speed-up and memory are measured on the pruned network (channels removed) "
               "against the dense model; points: mean over seeds, error bars ± 1 std.",
               status_note(table, lambda r: f"{method_name(r['config.method'])} at "
                                            f"{100 * r['config.sparsity']:g}%"), *marker_note(table)]
    panels = [p for p in PANELS if has(table, p.lines[0].stem)]
    fig = draw(table, x="sparsity_pct", panels=panels, xlabel="channel sparsity (%)",
               title=f"{TITLE}\n{context(runs, trials, sparsity=False)}", caption=caption,
               series="config.method", series_order=METHOD_ORDER, series_label=method_name,
               tick_label=lambda v: f"{v:g}")
    return Figure(NAME, TITLE, fig, table, caption)
