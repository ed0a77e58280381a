"""Structured (channel) pruning: accuracy, measured inference speed-up and memory against channel
sparsity, per method (VPNs at channel level, Network Slimming, DepGraph).

``sweeps/structured.py`` (phase ``pruned``: channel methods × channel sparsity; phase ``dense``:
the reference line). Each channel trial reports, as final metrics, its measurements against the
dense model (:func:`vpns_core.channel_pruning.compare`); this figure reads the columns below (the
first one present of each list); the accuracies are the usual ones.
"""
from __future__ import annotations

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, Line, Panel, context, draw,
                       has, marker_note, status_note)
from .runs import Runs, aggregate
from .sparsity_curves import METHOD_ORDER, dense_refs, method_name, split

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
    trials, dense = split(runs)
    metrics = {**{k: v for k, v in ACCURACY.items() if k.startswith("test_")},
               **{name: (_column(runs, name), 1.0) for name in COLUMNS if _column(runs, name)}}
    table = aggregate(trials, ["config.method", "config.sparsity"], metrics)
    table["sparsity_pct"] = 100 * table["config.sparsity"]
    _, refs = dense_refs(dense, {k: v for k, v in ACCURACY.items() if k.startswith("test_")}, False)
    caption = [f"{context(runs, trials, sparsity=False)}.", ACCURACY_NOTE,
               "Dense fine-tuning: dotted line (± std band)." if refs else "Dense reference not run.",
               "Speed-up and memory are measured on the pruned network (channels removed) "
               "against the dense model; points: mean over seeds, error bars ± 1 std.",
               status_note(table, lambda r: f"{method_name(r['config.method'])} at "
                                            f"{100 * r['config.sparsity']:g}%"), *marker_note(table)]
    panels = [p for p in PANELS if has(table, p.lines[0].stem)]
    fig = draw(table, x="sparsity_pct", panels=panels, xlabel="channel sparsity (%)",
               title=f"{TITLE}\n{context(runs, trials, sparsity=False)}", caption=caption,
               series="config.method", series_order=METHOD_ORDER, series_label=method_name,
               tick_label=lambda v: f"{v:g}", refs=refs)
    return Figure(NAME, TITLE, fig, table, caption)
