"""Pruning methods, read from the registry so that a newly registered method joins every sweep."""
from __future__ import annotations

from search_spaces import base as _base


def _registry():
    """The method registry, imported when a space is read (it imports torch, which a sweep's
    refusal of its flags should not wait for)."""
    from vpns_core.methods import METHODS
    return METHODS


def pruning_methods() -> list[str]:
    """Every registered method that removes weights (``dense`` is the reference line; channel
    methods have their own sweep, :func:`channel_methods`)."""
    methods = _registry()
    return [name for name in methods.names()
            if methods.get(name).prunes and not methods.get(name).structured]


def channel_methods() -> list[str]:
    """Every registered method that removes whole channels (``sweeps/structured.py``)."""
    methods = _registry()
    return [name for name in methods.names() if methods.get(name).structured]


def reference_methods() -> list[str]:
    methods = _registry()
    return [name for name in methods.names() if not methods.get(name).prunes]


def base(preset: str) -> dict:
    return _base.base(preset)


def space(preset: str) -> dict:
    return {"method": pruning_methods()}
