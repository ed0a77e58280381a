"""Pad-size ablation: width of the pad prompt's border at a fixed input size, plus "no prompt"."""
from __future__ import annotations

from search_spaces import base as _base, pick

NO_PROMPT = {"prompt": "none", "pad_size": 0}  # Config rejects a pad prompt of width 0


def _pads(*sizes: int) -> dict:
    return {"none": NO_PROMPT, **{size: {"pad_size": size} for size in sizes}}


def base(preset: str) -> dict:
    # default: 32 px Fashion-MNIST (its native 28 px, barely upsampled) in a 64 px frame: pads
    # 4..16 fill the 16 px zero border, 24 also overlays the image's outer 8 px (as the paper's
    # default pad 16 on 224 px does).
    extra = pick(preset, paper={}, default={"input_size": 32, "output_size": 64}, tiny={})
    return {**_base.base(preset), **extra}


def space(preset: str) -> dict:
    # paper: the reference code's allowed pads {0, 8, ..., 112} at input = output = 224, where the
    # prompt overlays the image's border.
    return {"pad": pick(preset, paper=_pads(*range(8, 113, 8)), default=_pads(4, 8, 12, 16, 24),
                        tiny=_pads(4))}
