"""Input-size ablation: how far the image is shrunk inside the fixed output frame, at a fixed pad."""
from __future__ import annotations

from vpns_core.config import ALLOWED_INPUT_SIZES_PAPER

from search_spaces import base as _base, pick


def base(preset: str) -> dict:
    return _base.base(preset)  # paper: pad 16 on 224 px; default: pad 8 on 64 px


def space(preset: str) -> dict:
    return {"input_size": pick(preset, paper=list(ALLOWED_INPUT_SIZES_PAPER),
                               default=[32, 40, 48, 56, 64], tiny=[16, 24])}
