"""Learning-rate search: validation accuracy of every trial against the mask-finding and the
weight-tuning learning rate (``sweeps/learning_rates.py``), finished and early-stopped trials
told apart, failed ones marked."""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.transforms import blended_transform_factory

from .plotting import Figure, context
from .runs import SELECT, Runs, cell_state

NAME = "learning_rates"
TITLE = "Learning-rate search"
STYLE = {"ok": ("o", "C0", "finished (selected validation accuracy)"),
         "stopped": ("o", "C1", "stopped early (last validation accuracy)"),
         "failed": ("x", "red", "failed (no accuracy)"),
         "missing": ("x", "grey", "never ended")}


def applicable(runs: Runs) -> bool:
    return runs.varies("config.mask_lr") or runs.varies("config.tune_lr")


def build(runs: Runs) -> Figure:
    trials = runs.trials
    table = pd.DataFrame({
        "trial_id": trials["trial_id"], "state": cell_state(trials),
        "mask_lr": trials["config.mask_lr"].astype(float), "tune_lr": trials["config.tune_lr"].astype(float),
        "seed": trials["config.seed"], "epochs_done": trials.get("epochs_done"),
    })
    last_val = trials["last.val_acc"] if "last.val_acc" in trials else math.nan
    selected = trials[SELECT] if SELECT in trials else pd.Series(math.nan, index=trials.index)
    table["val_acc_pct"] = 100 * selected.where(table["state"] == "ok", last_val).astype(float)
    for column, name in (("selected_test_acc_prompt", "test_prompt_pct"),
                         ("selected_test_acc_noprompt", "test_noprompt_pct")):
        table[name] = 100 * trials[column].astype(float) if column in trials else math.nan
    table = table.sort_values("val_acc_pct", ascending=False, na_position="last").reset_index(drop=True)
    counts = table["state"].value_counts()
    finished = table[table["state"] == "ok"]
    caption = [f"{context(runs, trials)}.",
               f"{len(table)} trials: {int(counts.get('ok', 0))} finished, {int(counts.get('stopped', 0))} "
               f"stopped early, {int(counts.get('failed', 0))} failed. Validation accuracy is what the "
               f"search optimises; test accuracy is never used to choose."]
    if len(finished):
        best = finished.iloc[0]
        caption.append(f"Best by validation: mask_lr {best['mask_lr']:.3g}, tune_lr {best['tune_lr']:.3g} "
                       f"(validation {best['val_acc_pct']:.1f}%; test {best['test_prompt_pct']:.1f}% with "
                       f"prompt, {best['test_noprompt_pct']:.1f}% without).")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    fig.subplots_adjust(top=0.82, bottom=0.3, wspace=0.25)
    fig.suptitle(f"{TITLE}\n{context(runs, trials)}", fontsize=11)
    for ax, column, label in ((axes[0], "mask_lr", "mask-finding learning rate (Adam)"),
                              (axes[1], "tune_lr", "weight-tuning learning rate (SGD)")):
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        for state, (marker, color, text) in STYLE.items():
            part = table[table["state"] == state]
            if part.empty:
                continue
            if marker == "o":
                ax.scatter(part[column], part["val_acc_pct"], marker="o", edgecolors=color,
                           facecolors=color if state == "ok" else "none", label=text)
            else:  # no accuracy: marked along the bottom of the panel
                ax.scatter(part[column], [0.04] * len(part), marker="x", c=color, label=text,
                           transform=bottom)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.1))
    fig.text(0.05, 0.01, textwrap.fill(" ".join(caption), 150), fontsize=7.5, va="bottom")
    return Figure(NAME, TITLE, fig, table, caption)
