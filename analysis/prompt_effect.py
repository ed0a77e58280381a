"""The investigation of what drives the prompt's effect (``sweeps/prompt_effect.py``): test
accuracy of every setting (mean ± std over seeds), grouped by phase, each phase's settings
tested against the HYDRA setting of the same phase where there is one (paired by seed, Holm)."""
from __future__ import annotations

import pandas as pd

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, paired_notes, accuracy_panels, context, draw,
                       fmt, marker_note, status_note)
from .runs import Runs, aggregate

NAME = "prompt_effect"
TITLE = "What drives the prompt's effect"


def applicable(runs: Runs) -> bool:
    return runs.script == NAME and "axis.setting" in runs.trials


def build(runs: Runs) -> Figure:
    trials = runs.trials.copy()
    phases = list(dict.fromkeys(trials["phase"]))
    trials["point"] = trials["phase"] + ": " + trials["axis.setting"].astype(str)
    order = list(dict.fromkeys(trials.sort_values("phase", key=lambda s: s.map(phases.index))["point"]))
    table = aggregate(trials, ["point"], ACCURACY)
    table["phase"] = table["point"].str.split(": ").str[0]

    def label(row: dict) -> str:
        return row["point"]
    caption = [f"{context(runs, trials)}. Settings in search_spaces/prompt_effect.py.", ACCURACY_NOTE,
               *against_hydra(table, phases),
               status_note(table, label), *marker_note(table)]
    fig = draw(table, x="point", panels=accuracy_panels(table), xlabel="phase: setting",
               title=f"{TITLE}\n{context(runs, trials)}", caption=caption, categorical=True,
               order=order)
    return Figure(NAME, TITLE, fig, table, caption, label=label)


def against_hydra(table: pd.DataFrame, phases: list[str]) -> list[str]:
    """Each VPNs setting of a phase against the phase's first HYDRA setting, paired by seed on
    the headline accuracy (:func:`vpns_core.stats.paired`), one Holm family over the figure."""
    groups = []
    for phase in phases:
        rows = [r for r in table.to_dict("records") if r["phase"] == phase and r["test_pct_n"] > 0]
        hydra = next((r for r in rows if ": hydra" in r["point"]), None)
        vpns = [r for r in rows if ": vpns" in r["point"]]
        if hydra is None or not vpns:
            continue
        def name(r):
            return r["point"].split(": ")[1]
        groups.append((f"Phase {phase}, headline accuracy against {name(hydra)} "
                       f"({fmt(hydra['test_pct_mean'], hydra['test_pct_std'])})",
                       {name(r): r["test_pct_by_seed"] for r in [hydra, *vpns]},
                       [(name(r), name(hydra)) for r in vpns]))
    return paired_notes(groups)
