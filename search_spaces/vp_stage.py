"""VP-stage ablation: the prompt in both stages (VPNs), only in mask finding, only in weight
tuning, or never (which is exactly HYDRA)."""
from __future__ import annotations

from vpns_core.config import VP_STAGES

from search_spaces import base as _base


def base(preset: str) -> dict:
    return _base.base(preset)


def space(preset: str) -> dict:
    return {"vp_stages": list(VP_STAGES)}
