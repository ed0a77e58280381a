"""Transfer: masks found on a source task (phase ``source``) fine-tuned on target tasks (phase
``target``), per method (``sweeps/transfer.py``)."""
from __future__ import annotations

import pandas as pd

from .plotting import (ACCURACY, ACCURACY_NOTE, DATASET_NAMES, Figure, context, draw, marker_note,
                       best_notes, fmt, metric_panels, ordered, status_note)
from .runs import Runs, aggregate
from .sparsity_curves import METHOD_ORDER, method_name

NAME = "transfer"
TITLE = "Transfer of masks from a source to a target task"


def applicable(runs: Runs) -> bool:
    """Trials that fine-tune a mask found by a source trial (the ``mask`` axis of the sweep)."""
    return "axis.mask" in runs.trials and runs.trials["config.mask_file"].notna().any()


def source_of(row) -> str:
    """The source dataset, from the ``mask`` axis label ``<dataset>/<method>/seed<k>``."""
    label = row.get("axis.mask")
    if isinstance(label, str) and "/" in label:
        return label.split("/")[0]
    return "?"


def _name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def build(runs: Runs) -> Figure:
    trials = runs.trials
    target = trials[trials["config.mask_file"].notna()].copy()
    source = trials[trials["config.mask_file"].isna()]
    target["transfer"] = [f"{_name(source_of(r))} → {_name(r['config.dataset'])}"
                          for _, r in target.iterrows()]
    seeds = ordered(trials["config.seed"])  # a failed source seed leaves its targets missing
    table = aggregate(target, ["transfer", "config.method"], ACCURACY, seeds=seeds)

    def label(row) -> str:
        return method_name(row["config.method"])
    notes = best_notes(table, label, by="transfer",
                       heading=lambda pair: f"{pair}, headline accuracy, highest method against the others")
    source_text = "not in these runs"
    if len(source):
        src = aggregate(source, ["config.dataset", "config.method"], ACCURACY, seeds=seeds)
        source_text = "; ".join(
            f"{_name(r['config.dataset'])} {method_name(r['config.method'])}: {int(r['ok'])}/"
            f"{int(r['seeds'])} finished"
            + (f", after mask finding {fmt(r['mask_prompt_pct_mean'], r['mask_prompt_pct_std'])} "
               f"with prompt, {fmt(r['mask_noprompt_pct_mean'], r['mask_noprompt_pct_std'])} without"
               if r["mask_prompt_pct_n"] else "")
            for _, r in src.iterrows())
    caption = [f"{context(runs, target)}.",
               "Each mask is found on the source task (mask finding only) and fine-tuned on the "
               "target task with its method and seed (weights, and the prompt where the method "
               "uses one). " + ACCURACY_NOTE,
               f"Source masks: {source_text}.", *notes,
               status_note(table, lambda r: f"{r['transfer']} / {label(r)}"), *marker_note(table)]
    fig = draw(table, x="transfer", panels=metric_panels(table, ("test_prompt_pct", "test_noprompt_pct")),
               xlabel="source → target", title=f"{TITLE}\n{context(runs, target)}", caption=caption,
               categorical=True, series="config.method", series_order=METHOD_ORDER,
               series_label=method_name)
    return Figure(NAME, TITLE, fig, pd.DataFrame(table), caption)
