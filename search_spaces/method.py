"""Pruning methods, read from the registry so that a newly registered method joins every sweep."""
from __future__ import annotations

from vpns_core.methods import METHODS

from search_spaces import base as _base


def pruning_methods() -> list[str]:
    """Every registered method that removes weights (``dense`` is the reference line; channel
    methods have their own sweep, :func:`channel_methods`)."""
    return [name for name in METHODS.names()
            if METHODS.get(name).prunes and not METHODS.get(name).structured]


def channel_methods() -> list[str]:
    """Every registered method that removes whole channels (``sweeps/structured.py``)."""
    return [name for name in METHODS.names() if METHODS.get(name).structured]


def reference_methods() -> list[str]:
    return [name for name in METHODS.names() if not METHODS.get(name).prunes]


def base(preset: str) -> dict:
    return _base.base(preset)


def space(preset: str) -> dict:
    return {"method": pruning_methods()}
