"""Pad-size ablation: test accuracy against the width of the pad prompt at a fixed input size
(``sweeps/ablation_pad.py``), against the controls that take the pads' exact updates: the pad
frozen at zero (``learn_prompt=False``) and no prompt with as many updates (``matched_updates``).
A no-prompt arm with fewer updates (the one-step arm of older sweeps under the reference loop)
is drawn apart and named so."""
from __future__ import annotations

import pandas as pd

from .plotting import Figure, accuracy_figure, ordered
from .runs import Runs

NAME = "pad_size"
TITLE = "Pad-size ablation"
FROZEN = "pad frozen at zero (same updates)"
MATCHED = "no prompt, as many updates"
HALF = "no prompt, half the updates"


def applicable(runs: Runs) -> bool:
    return runs.varies("config.pad_size")


def _flag(trials: pd.DataFrame, column: str, default: bool) -> pd.Series:
    return trials[column].fillna(default).astype(bool) if column in trials else pd.Series(default, index=trials.index)


def split(trials: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The learned pads, and the controls by label."""
    none = trials["config.prompt"] == "none"
    learned = _flag(trials, "config.learn_prompt", True)
    matched = _flag(trials, "config.matched_updates", False) | (trials["config.schedule"] != "reference")
    controls = {FROZEN: trials[~none & ~learned], MATCHED: trials[none & matched],
                HALF: trials[none & ~matched]}
    return trials[~none & learned], {k: v for k, v in controls.items() if len(v)}


def build(runs: Runs) -> Figure:
    trials = runs.trials.copy()
    trials["pad_px"] = trials["config.pad_size"].where(trials["config.prompt"] != "none", 0).astype(int)
    frames = ", ".join(f"{i} px image in a {o} px frame" for i, o in
                       ordered(zip(trials["config.input_size"], trials["config.output_size"])))
    pads, controls = split(trials)
    if pads.empty:  # only controls ran: plot them as the points
        pads, controls = trials, {}
    loop = ""
    if (trials["config.schedule"] == "reference").all():
        loop = (" Under the authors' loop (schedule reference) a prompted iteration takes two steps "
                "(a prompted, unaugmented one and an unprompted, augmented one): the frozen pad "
                "takes exactly those steps with a prompt that cannot move, and no prompt with as "
                "many updates runs twice the epochs of one augmented step.")
    drawn = "; ".join(f"{'dotted' if i == 0 else 'dash-dotted' if i == 1 else 'dashed'} line and "
                      f"grey band: {label}" for i, label in enumerate(controls))
    return accuracy_figure(runs, pads, name=NAME, title=TITLE, x="pad_px",
                           xlabel="pad width (px per side)", tick_label=str,
                           setting=f"Input size fixed: {frames}. "
                                   + (f"Controls ({drawn}; mean ± std over seeds).{loop}" if controls else ""),
                           references=controls)
