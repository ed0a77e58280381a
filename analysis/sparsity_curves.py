"""Method × sparsity curves per dataset, with dense fine-tuning as a reference line
(``sweeps/sparsity_curves.py``: phase ``pruned`` and phase ``dense``)."""
from __future__ import annotations

import pandas as pd

from vpns_core.methods import METHODS

from .plotting import (ACCURACY, ACCURACY_NOTE, DATASET_NAMES, Figure, context, draw, marker_note,
                       best_notes, fmt, metric_panels, status_note)
from .runs import Runs, aggregate

NAME = "sparsity_curves"
TITLE = "Accuracy against sparsity per method"
#: every registered method, in the order of its registration's ``plot_order``
METHOD_ORDER = tuple(sorted(METHODS, key=lambda name: METHODS.get(name).plot_order))
STEMS = ("test_prompt_pct", "test_noprompt_pct", "mask_prompt_pct", "mask_noprompt_pct")


def method_name(method: str) -> str:
    """The method's registered ``label`` (the name itself for a method no longer registered)."""
    return METHODS.get(method).label if method in METHODS else method


def applicable(runs: Runs) -> bool:
    pruned = runs.trials[runs.trials["config.method"] != "dense"]
    return pruned["config.sparsity"].nunique() > 1 or (
        runs.varies("config.method") and runs.varies("config.sparsity"))


def split(runs: Runs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pruned trials, dense trials)."""
    trials = runs.trials
    dense = trials["config.method"] == "dense"
    return trials[~dense], trials[dense]


def dense_refs(dense: pd.DataFrame, metrics: dict, rows: bool) -> tuple[pd.DataFrame, dict]:
    """Dense fine-tuning aggregated per dataset, and the reference lines it draws."""
    if dense.empty:
        return pd.DataFrame(), {}
    table = aggregate(dense, ["config.dataset"], metrics)
    refs = {}
    for _, row in table.iterrows():
        for stem in metrics:
            refs[(row["config.dataset"] if rows else None, stem)] = (
                row[f"{stem}_mean"], row[f"{stem}_std"], "dense fine-tuning (line: mean, band: ± std)")
    table.insert(1, "config.method", "dense")
    return table, refs


def sparsity_tables(runs: Runs, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict, bool]:
    """Per dataset, method and sparsity, ``metrics`` aggregated over seeds (with ``sparsity_pct``);
    dense fine-tuning's table and reference lines; and whether there are several datasets."""
    pruned, dense = split(runs)
    by_dataset = pruned["config.dataset"].nunique() > 1
    table = aggregate(pruned, ["config.dataset", "config.method", "config.sparsity"], metrics)
    table["sparsity_pct"] = 100 * table["config.sparsity"]
    dense_table, refs = dense_refs(dense, metrics, by_dataset)
    return table, dense_table, refs, by_dataset


def build(runs: Runs) -> Figure:
    table, dense_table, refs, by_dataset = sparsity_tables(runs, ACCURACY)

    def label(row) -> str:
        return method_name(row["config.method"])
    notes = best_notes(table, label, by=["config.dataset", "config.sparsity"],
                       heading=lambda point: f"{DATASET_NAMES.get(point[0], point[0])} at "
                                             f"{100 * point[1]:g}% sparsity, headline accuracy, "
                                             f"highest method against the others")
    dense_text = "; ".join(
        f"{DATASET_NAMES.get(r['config.dataset'], r['config.dataset'])}: with prompt "
        f"{fmt(r['test_prompt_pct_mean'], r['test_prompt_pct_std'])}, without "
        f"{fmt(r['test_noprompt_pct_mean'], r['test_noprompt_pct_std'])}"
        for _, r in dense_table.iterrows()) if len(dense_table) else "not run"
    both = pd.concat([table, dense_table], ignore_index=True) if len(dense_table) else table
    caption = [f"{context(runs, runs.trials, sparsity=False)}.", ACCURACY_NOTE,
               f"Dense fine-tuning (dotted line, ± std band): {dense_text}.", *notes,
               status_note(both, lambda r: f"{label(r)}" + (
                   f" at {100 * r['config.sparsity']:g}%" if r["config.method"] != "dense" else "")),
               *marker_note(both)]
    fig = draw(table, x="sparsity_pct", panels=metric_panels(table, STEMS), xlabel="sparsity (%)",
               title=f"{TITLE}\n{context(runs, runs.trials, sparsity=False)}", caption=caption,
               series="config.method", series_order=METHOD_ORDER, series_label=method_name,
               rows="config.dataset" if by_dataset else None,
               row_label=lambda d: DATASET_NAMES.get(d, d), refs=refs, tick_label=lambda v: f"{v:g}")
    return Figure(NAME, TITLE, fig, both, caption)
