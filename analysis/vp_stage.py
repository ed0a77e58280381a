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


def build(runs: Runs) -> Figure:
    return accuracy_figure(runs, runs.trials, name=NAME, title=TITLE, x="config.vp_stages",
                           xlabel="stages with the prompt", categorical=True, order=ORDER,
                           tick_label=lambda v: NAMES.get(v, v),
                           setting="Stages that train with the visual prompt; 'tested with prompt' "
                                   "adds the learned prompt at test time (none for HYDRA).")
