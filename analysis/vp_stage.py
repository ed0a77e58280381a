"""VP-stage ablation: the prompt in both stages (VPNs), only in mask finding, only in weight
tuning, or never (HYDRA) (``sweeps/ablation_stage.py``)."""
from __future__ import annotations

from .plotting import Figure, accuracy_figure
from .runs import Runs

NAME = "vp_stage"
TITLE = "VP-stage ablation"
ORDER = ("both", "mask", "tune", "none")
NAMES = {"both": "both (VPNs)", "mask": "mask finding only", "tune": "weight tuning only",
         "none": "none (HYDRA)"}


def applicable(runs: Runs) -> bool:
    return runs.varies("config.vp_stages")


def updates_note(trials) -> str:
    """How the arms' updates compare: equal under the paper schedule, equal under the reference
    loop with ``matched_updates``, otherwise fewer for the stages without the prompt."""
    reference = trials["config.schedule"] == "reference"
    if not reference.any():
        return " Every arm takes one step per iteration: the same updates."
    matched = trials.get("config.matched_updates")
    if matched is not None and matched[reference].fillna(False).astype(bool).all():
        return (" Under the reference loop a stage without the prompt runs twice its epochs "
                "(matched_updates), so every arm takes the same updates in every stage.")
    return (" Under the reference loop a stage without the prompt takes one step per iteration "
            "and a prompted stage two: arms without the prompt in a stage take half its updates.")


def build(runs: Runs) -> Figure:
    return accuracy_figure(runs, runs.trials, name=NAME, title=TITLE, x="config.vp_stages",
                           xlabel="stages with the prompt", categorical=True, order=ORDER,
                           tick_label=lambda v: NAMES.get(v, v),
                           setting="Stages that train with the visual prompt; 'tested with prompt' "
                                   "adds the learned prompt at test time (none for HYDRA)."
                                   + updates_note(runs.trials))
