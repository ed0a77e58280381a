"""The N:M study (``sweeps/ablation_nm.py``): headline test accuracy of each arm at 2:4 and at
50% unstructured sparsity, and what the prompt adds under each pattern: VPNs against the frozen
pad, HYDRA and OMP, paired by seed, Holm over the figure's comparisons."""
from __future__ import annotations

from search_spaces.nm import COMPARISONS

from .plotting import ACCURACY, ACCURACY_NOTE, Figure, context, draw, marker_note, metric_panels, paired_notes, status_note
from .runs import Runs, aggregate

NAME = "nm"
TITLE = "What the prompt adds under N:M (2:4) sparsity"


def applicable(runs: Runs) -> bool:
    return runs.script == "ablation_nm" and "axis.pattern_arm" in runs.trials


def build(runs: Runs) -> Figure:
    trials = runs.trials.copy()
    parts = trials["axis.pattern_arm"].astype(str).str.split(" · ", n=1)
    trials["pattern"], trials["arm"] = parts.str[0], parts.str[1]
    table = aggregate(trials, ["pattern", "arm"], ACCURACY)
    groups = []
    for pattern, part in table.groupby("pattern", sort=False):
        values = {r["arm"]: r["test_pct_by_seed"] for r in part.to_dict("records") if r["test_pct_n"] > 0}
        pairs = [(a, c) for a, c in COMPARISONS if a in values and c in values]
        groups.append((f"{pattern}, headline accuracy", values, pairs))
    caption = [f"{context(runs, trials, sparsity=False)}. Arms in search_spaces/nm.py; every arm takes "
               f"the same updates (matched_updates).", ACCURACY_NOTE, *paired_notes(groups),
               status_note(table, lambda r: f"{r['pattern']} {r['arm']}"), *marker_note(table)]
    fig = draw(table, x="arm", panels=metric_panels(table, ("test_pct",)), xlabel="arm",
               title=f"{TITLE}\n{context(runs, trials, sparsity=False)}", caption=caption,
               categorical=True, order=[a for a, _ in COMPARISONS[:1]] + [c for _, c in COMPARISONS],
               series="pattern", series_order=["2:4", "unstructured 50%"])
    return Figure(NAME, TITLE, fig, table, caption, label=lambda r: f"{r['pattern']} {r['arm']}")
