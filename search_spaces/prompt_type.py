"""Prompt-type ablation: pad, fix and random prompts with the same number of tunable values.

``prompt_size=None`` makes fix/random squares as large as the pad prompt's tunable area
(``equal_param_prompt_size``: 115 px for pad 16 on 224 px, as in the reference code).
"""
from __future__ import annotations

from search_spaces import base as _base


def base(preset: str) -> dict:
    return {**_base.base(preset), "prompt_size": None}


def space(preset: str) -> dict:
    return {"prompt": ["pad", "fix", "random"]}
