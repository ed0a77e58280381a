"""The investigation of what drives the prompt's effect (``sweeps/prompt_effect.py``): test
accuracy of every setting (mean ± std over seeds), grouped by phase, each phase's settings
judged against the HYDRA setting of the same phase where there is one."""
from __future__ import annotations

import pandas as pd

from .plotting import (ACCURACY, ACCURACY_NOTE, Figure, accuracy_panels, context, draw, fmt, has,
                       marker_note, status_note)
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
               *[n for n in (against_hydra(table, phase) for phase in phases) if n],
               status_note(table, label), *marker_note(table)]
    fig = draw(table, x="point", panels=accuracy_panels(table), xlabel="phase: setting",
               title=f"{TITLE}\n{context(runs, trials)}", caption=caption, categorical=True,
               order=order)
    return Figure(NAME, TITLE, fig, table, caption, label=label)


def against_hydra(table: pd.DataFrame, phase: str) -> str:
    """Each VPNs setting of ``phase`` against the phase's first HYDRA setting: the difference of
    means, and whether it exceeds seed noise (mean ± std intervals that do not overlap)."""
    rows = [r for r in table.to_dict("records") if r["phase"] == phase and r["test_prompt_pct_n"] > 0]
    hydra = next((r for r in rows if ": hydra" in r["point"]), None)
    if hydra is None:
        return ""
    parts = []
    for r in rows:
        if ": vpns" not in r["point"]:
            continue
        stem = "test_prompt_pct" if "reference" not in r["point"] else "test_noprompt_pct"
        if not has(table, stem):
            continue
        diff = r[f"{stem}_mean"] - hydra[f"{stem}_mean"]
        apart = (abs(diff) > r[f"{stem}_std"] + hydra[f"{stem}_std"]
                 if r[f"{stem}_n"] > 1 and hydra[f"{stem}_n"] > 1 else None)
        verdict = {True: "beyond seed noise", False: "within seed noise", None: "noise not measured"}[apart]
        parts.append(f"{r['point'].split(': ')[1]} {fmt(r[f'{stem}_mean'], r[f'{stem}_std'])} "
                     f"({diff:+.1f} points, {verdict})")
    if not parts:
        return ""
    return (f"Phase {phase}, against {hydra['point'].split(': ')[1]} "
            f"({fmt(hydra['test_prompt_pct_mean'], hydra['test_prompt_pct_std'])}): " + "; ".join(parts) + ".")
