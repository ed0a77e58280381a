"""Architecture comparison: accuracy of each method on each source architecture
(``sweeps/architectures.py``)."""
from __future__ import annotations

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, best_notes, context, draw, marker_note,
                       metric_panels, status_note)
from .runs import Runs, aggregate
from .sparsity_curves import METHOD_ORDER, STEMS, method_name

NAME = "architectures"
TITLE = "Architectures"


def applicable(runs: Runs) -> bool:
    return runs.varies("config.model") or runs.varies("axis.architecture")


def architecture(row) -> str:
    label = row.get("axis.architecture")
    if isinstance(label, str) and label:
        return label
    return f"{row['config.model']}{'' if row['config.pretrained'] else ' (scratch)'}"


def build(runs: Runs) -> Figure:
    trials = runs.trials.copy()
    trials["architecture"] = trials.apply(architecture, axis=1)
    table = aggregate(trials, ["architecture", "config.method"], ACCURACY)

    def label(row) -> str:
        return method_name(row["config.method"])
    notes = best_notes(table, label, by="architecture",
                       heading=lambda arch: f"{arch}, headline accuracy, highest method against the others")
    models = "; ".join(sorted({f"{architecture(r)} = {r['config.model']}, "
                               f"{'ImageNet-pretrained' if r['config.pretrained'] else 'random init'}"
                               for _, r in trials.iterrows()}))
    caption = [f"{context(runs, trials)}. Architectures: {models}.", ACCURACY_NOTE, *notes,
               status_note(table, lambda r: f"{r['architecture']} / {label(r)}"), *marker_note(table)]
    fig = draw(table, x="architecture", panels=metric_panels(table, STEMS), xlabel="source architecture",
               title=f"{TITLE}\n{context(runs, trials)}", caption=caption, categorical=True,
               series="config.method", series_order=METHOD_ORDER, series_label=method_name)
    return Figure(NAME, TITLE, fig, table, caption)
