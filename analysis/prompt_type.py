"""Prompt-type ablation: pad, fix and random prompts at an equal number of tunable values
(``sweeps/ablation_prompt.py``)."""
from __future__ import annotations

from .plotting import Figure, accuracy_figure, ordered
from .runs import Runs

NAME = "prompt_type"
TITLE = "Prompt-type ablation"
ORDER = ("pad", "fix", "random", "none")


def applicable(runs: Runs) -> bool:
    kinds = set(runs.trials.get("config.prompt", [])) & {"pad", "fix", "random"}
    return len(kinds) >= 2


def build(runs: Runs) -> Figure:
    trials = runs.trials
    tunable = []
    for prompt in ordered(trials["config.prompt"], ORDER):
        counts = trials.loc[trials["config.prompt"] == prompt].get("prompt_tunable")
        counts = ordered(counts.dropna().astype(int)) if counts is not None else []
        tunable.append(f"{prompt} {'/'.join(map(str, counts)) or '?'}")
    return accuracy_figure(runs, trials, name=NAME, title=TITLE, x="config.prompt",
                           xlabel="prompt type", categorical=True, order=ORDER,
                           setting=f"Tunable prompt values: {', '.join(tunable)}.")
