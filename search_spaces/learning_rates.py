"""Learning rates of both stages (log-uniform), searched by Optuna; centred on the preset's values.

Stage 1 (scores + prompt, Adam): the reference code uses 1e-4 at batch 256; stage 2 (weights +
prompt, SGD momentum 0.9): 0.01.
"""
from __future__ import annotations

from ray import tune

from search_spaces import base as _base, pick


def base(preset: str) -> dict:
    return _base.base(preset)


def space(preset: str) -> dict:
    mask, weights = pick(preset, paper=((1e-5, 1e-2), (1e-3, 1e-1)),
                         default=((1e-3, 1e-1), (1e-3, 1e-1)), tiny=((1e-3, 1e-1), (1e-3, 1e-1)))
    return {"mask_lr": tune.loguniform(*mask), "tune_lr": tune.loguniform(*weights)}
