"""Pad-size ablation: test accuracy against the width of the pad prompt at a fixed input size
(``sweeps/ablation_pad.py``); "none" (0 px) is the same pruning without any prompt."""
from __future__ import annotations

from .plotting import Figure, accuracy_figure, ordered
from .runs import Runs

NAME = "pad_size"
TITLE = "Pad-size ablation"


def applicable(runs: Runs) -> bool:
    return runs.varies("config.pad_size")


def build(runs: Runs) -> Figure:
    trials = runs.trials.copy()
    trials["pad_px"] = trials["config.pad_size"].where(trials["config.prompt"] != "none", 0).astype(int)
    frames = ", ".join(f"{i} px image in a {o} px frame" for i, o in
                       ordered(zip(trials["config.input_size"], trials["config.output_size"])))
    pads, none = trials[trials["pad_px"] > 0], trials[trials["pad_px"] == 0]
    if pads.empty:  # only the no-prompt setting ran: plot it as the one point
        pads, none = trials, None
    loop = ""
    if none is not None and "config.schedule" in trials and (trials["config.schedule"] == "reference").all():
        loop = (" Under the authors' loop (schedule reference) a prompt adds a prompted step to every "
                "iteration, so the pads take twice the no-prompt setting's updates.")
    return accuracy_figure(runs, pads, name=NAME, title=TITLE, x="pad_px",
                           xlabel="pad width (px per side)",
                           tick_label=lambda v: "none" if v == 0 else f"{v}",
                           setting=f"Input size fixed: {frames}. Dotted line and grey band: the "
                                   f"same pruning without any prompt (mean ± std over seeds).{loop}",
                           reference=none, reference_label="no prompt")
