"""Input-size ablation: test accuracy against the size the image is resized to inside a fixed
output frame, at a fixed pad width (``sweeps/ablation_input_size.py``)."""
from __future__ import annotations

from .plotting import Figure, accuracy_figure, ordered
from .runs import Runs

NAME = "input_size"
TITLE = "Input-size ablation"


def applicable(runs: Runs) -> bool:
    return runs.varies("config.input_size")


def build(runs: Runs) -> Figure:
    trials = runs.trials
    pads = ", ".join(f"{p} px" for p in ordered(trials["config.pad_size"]))
    frames = ", ".join(f"{o} px" for o in ordered(trials["config.output_size"]))
    prompts = ", ".join(ordered(trials["config.prompt"]))
    return accuracy_figure(runs, trials, name=NAME, title=TITLE, x="config.input_size",
                           xlabel="input size (px)",
                           setting=f"Pad fixed at {pads} ({prompts} prompt) in a {frames} frame.")
