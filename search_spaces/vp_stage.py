"""VP-stage ablation: the prompt in both stages, only in mask finding, only in weight tuning, or
never (which is exactly HYDRA). ``matched_updates``: under the reference schedule a stage without
the prompt runs twice its epochs, so every arm takes the same updates in every stage (a prompted
iteration there takes two steps, an unprompted one)."""
from __future__ import annotations

from vpns_core.config import VP_STAGES

from search_spaces import base as _base


def base(preset: str) -> dict:
    return {**_base.base(preset), "matched_updates": True}


def space(preset: str) -> dict:
    return {"vp_stages": list(VP_STAGES)}
