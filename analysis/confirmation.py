"""The pre-registered confirmation (``sweeps/confirm_prompt.py``; README, "Confirmation"): each
arm's test accuracy without the prompt per seed, and the hypotheses H1-H3 of
``search_spaces/confirmation.py`` tested as planned: paired by seed, two-sided t-interval,
Holm over the three. Its CSV holds one row per arm and seed: the numbers the README's table
comes from."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from search_spaces.confirmation import HYPOTHESES
from vpns_core.stats import Comparison, paired

from .plotting import Figure, context, ordered
from .runs import Runs, cell_state

NAME = "confirmation"
TITLE = "Confirmation of the prompt's effect (pre-registered)"
COLUMN = "selected_test_acc_noprompt"  # the plan's column: the reference schedule's headline


def applicable(runs: Runs) -> bool:
    return runs.script == "confirm_prompt" and "axis.arm" in runs.trials


def per_seed(runs: Runs) -> pd.DataFrame:
    """One row per trial: arm, seed, state and accuracies in % (NaN where it did not finish)."""
    t = runs.trials
    state = cell_state(t)
    rows = pd.DataFrame({
        "arm": t["axis.arm"].astype(str), "seed": t["config.seed"].astype(int),
        "sparsity": t["config.sparsity"].astype(float), "state": state,
        "test_noprompt_pct": 100 * pd.to_numeric(t.get(COLUMN), errors="coerce"),
        "test_prompt_pct": 100 * pd.to_numeric(t.get("selected_test_acc_prompt"), errors="coerce"),
        "grad_steps": pd.to_numeric(t.get("last.grad_steps"), errors="coerce"),
        "trial_time_s": pd.to_numeric(t.get("last.trial_time_s", t.get("trial_time_s")), errors="coerce"),
    })
    rows.loc[rows["state"] != "ok", ["test_noprompt_pct", "test_prompt_pct"]] = math.nan
    return rows.sort_values(["arm", "seed"]).reset_index(drop=True)


def verdict(c: Comparison) -> str:
    """The plan's words: reproduced / contradicted (the corrected interval above / below zero),
    not resolved (it contains zero), not tested (fewer than 3 paired seeds)."""
    if c.verdict == "resolved":
        return "reproduced" if c.diff > 0 else "contradicted"
    return c.verdict


def tests(rows: pd.DataFrame) -> dict[str, Comparison]:
    values = {arm: dict(zip(g["seed"], g["test_noprompt_pct"])) for arm, g in rows.groupby("arm")}
    names = list(HYPOTHESES)
    return dict(zip(names, paired(values, [HYPOTHESES[h] for h in names])))


def build(runs: Runs) -> Figure:
    rows = per_seed(runs)
    results = tests(rows)
    arms = ordered(rows["arm"], list(dict.fromkeys(a for pair in HYPOTHESES.values() for a in pair)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.6), gridspec_kw={"width_ratios": [1.4, 1]})
    for i, arm in enumerate(arms):
        part = rows[rows["arm"] == arm]
        left.plot([i] * len(part), part["test_noprompt_pct"], "o", color="tab:blue", alpha=0.5, ms=4)
        if part["test_noprompt_pct"].notna().any():
            left.plot([i - 0.25, i + 0.25], [part["test_noprompt_pct"].mean()] * 2, color="black", lw=2)
    left.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("test accuracy without prompt (%)")
    left.set_title("each seed (dots) and the mean (bar)", fontsize=9.5)
    left.grid(alpha=0.3)
    names = list(results)
    for j, h in enumerate(names):
        c = results[h]
        if not math.isnan(c.low):
            right.errorbar([c.diff], [j], xerr=[[c.diff - c.low], [c.high - c.diff]], fmt="o",
                           color="tab:red", capsize=4)
        elif not math.isnan(c.diff):
            right.plot([c.diff], [j], "x", color="tab:red")
    right.axvline(0, color="black", lw=1)
    right.set_yticks(range(len(names)), [f"{h}: {a} − {b}" for h, (a, b) in
                                         ((h, HYPOTHESES[h]) for h in names)], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("paired difference (points), Holm-corrected 95% CI")
    right.grid(alpha=0.3)
    trials = runs.trials
    caption = [f"{context(runs, trials, sparsity=False)}; data_seed "
               f"{', '.join(map(str, ordered(trials['config.data_seed'])))}.",
               "Plan (written before the run): H1 pad8 − pad8_frozen at 90%, H2 the same at 99%, "
               "H3 pad8 − none_matched at 90%, each on test accuracy without the prompt at the "
               "validation-selected epoch, paired by seed, t-interval Holm-corrected over H1-H3; "
               "reproduced if the interval lies above zero, contradicted if below, not resolved "
               "if it contains zero.",
               *[f"{h}: {c.text(verdict=verdict(c))}." for h, c in results.items()]]
    failed = rows[rows["state"] != "ok"]
    if len(failed):
        caption.append("Not finished (dropped from their pairs): " + ", ".join(
            f"{r.arm} seed {r.seed} ({r.state})" for r in failed.itertuples()) + ".")
    fig.suptitle(TITLE, fontsize=11)
    fig.text(0.01, 0.01, "\n".join(_wrap(s) for s in caption[2:]), fontsize=7.5, va="bottom")
    fig.subplots_adjust(bottom=0.32, left=0.07, right=0.97, wspace=0.6, top=0.9)
    return Figure(NAME, TITLE, fig, rows, caption)


def _wrap(text: str, width: int = 170) -> str:
    import textwrap
    return textwrap.fill(text, width)
