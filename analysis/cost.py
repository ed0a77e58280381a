"""Computational cost per method and sparsity: wall time, epochs and gradient steps to the end
of each trial (from ``sweeps/sparsity_curves.py``'s trials)."""
from __future__ import annotations

import pandas as pd

from .plotting import DATASET_NAMES, Figure, Line, Panel, context, draw, marker_note, status_note
from .runs import Runs
from .sparsity_curves import METHOD_ORDER, method_name, sparsity_tables, split

NAME = "cost"
TITLE = "Computational cost per method and sparsity"
#: cumulative at the trial's last epoch (the export's top-level wall_time_s and epochs_done)
COST = {"wall_time_s": ("wall_time_s", 1.0), "epochs": ("epochs_done", 1.0),
        "grad_steps": ("last.grad_steps", 1.0)}
PANELS = [Panel("wall time", [Line("wall_time_s", "")], "training wall time (s)", from_zero=True),
          Panel("epochs", [Line("epochs", "")], "epochs trained", from_zero=True),
          Panel("gradient steps", [Line("grad_steps", "")], "gradient steps (parameter updates)",
                from_zero=True)]


def applicable(runs: Runs) -> bool:
    pruned, _ = split(runs)
    return "last.grad_steps" in runs.trials and runs.varies("config.method") and \
        pruned["config.sparsity"].nunique() > 1


def build(runs: Runs) -> Figure:
    table, dense_table, refs, by_dataset = sparsity_tables(runs, COST)
    both = pd.concat([table, dense_table], ignore_index=True) if len(dense_table) else table
    caption = [f"{context(runs, runs.trials, sparsity=False)}.",
               "Cumulative cost at the end of each finished trial: wall time of training epochs "
               "and untrained steps (scoring, LTH pruning; evaluation excluded), measured with the "
               "sweep's concurrent trials sharing the machine; epochs of all stages (LTH rounds "
               "included); gradient steps = parameter updates (a BiP iteration counts two). "
               "Early-stopped trials are not counted (their cost is not a full run's). "
               "Points: mean over seeds; error bars: ± 1 std; dotted line: dense fine-tuning.",
               status_note(both, lambda r: method_name(r["config.method"]) + (
                   f" at {100 * r['config.sparsity']:g}%" if r["config.method"] != "dense" else "")),
               *marker_note(both)]
    fig = draw(table, x="sparsity_pct", panels=PANELS, xlabel="sparsity (%)",
               title=f"{TITLE}\n{context(runs, runs.trials, sparsity=False)}", caption=caption,
               series="config.method", series_order=METHOD_ORDER, series_label=method_name,
               rows="config.dataset" if by_dataset else None,
               row_label=lambda d: DATASET_NAMES.get(d, d), refs=refs, tick_label=lambda v: f"{v:g}")
    return Figure(NAME, TITLE, fig, both, caption)
