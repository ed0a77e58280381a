"""Sparsity levels: the reference code's densities 0.6 ... 0.1 on the paper preset."""
from __future__ import annotations

from search_spaces import base as _base, pick


def base(preset: str) -> dict:
    return _base.base(preset)


def levels(preset: str) -> list[float]:
    return pick(preset, paper=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9], default=[0.5, 0.7, 0.9],
                tiny=[0.8])


def space(preset: str) -> dict:
    return {"sparsity": levels(preset)}
