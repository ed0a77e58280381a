"""Pad-size ablation: width of the pad prompt's border at a fixed input size, plus "no prompt"."""
from __future__ import annotations

from search_spaces import base as _base, pick

NO_PROMPT = {"prompt": "none", "pad_size": 0}  # Config rejects a pad prompt of width 0


def _pads(*sizes: int) -> dict:
    return {"none": NO_PROMPT, **{size: {"pad_size": size} for size in sizes}}


def base(preset: str) -> dict:
    # default: the preset's authors' layout (a 64 px image, the prompt over its border) and loop.
    return _base.base(preset)


def space(preset: str) -> dict:
    # paper: the reference code's allowed pads {0, 8, ..., 112} at input = output = 224, where the
    # prompt overlays the image's border. default: pads 4 (23% of the input, near the paper's
    # 26% for 16 of 224 px) and 8 (44%) and no prompt, at three seeds in under 25 minutes on 2
    # CPUs; "none" is HYDRA with the same epochs (the reference loop then takes one step per
    # iteration: see the README's investigation for HYDRA with as many updates).
    return {"pad": pick(preset, paper=_pads(*range(8, 113, 8)), default=_pads(4, 8),
                        tiny=_pads(4))}
