"""Search spaces as data: one small module per sweep axis.

Each module has ``base(preset) -> dict`` (the fixed :class:`vpns_core.Config` values of the sweep)
and ``space(preset) -> dict`` (the axes). An axis maps a name to its values:

- a ``Config`` field name -> a list of values (a grid under ``--search grid``, ``tune.choice``
  under Optuna) or a Tune domain such as ``tune.loguniform(...)`` (sampled in both modes);
- any other name -> *named points* ``{label: {field: value, ...}}``: partial configs that move
  several fields together, e.g. the pad sweep's ``"none"`` point is ``prompt='none', pad_size=0``.

:mod:`search_spaces.points` resolves named points, lists every point of a space and checks them
(without Ray).

A search whose axes depend on each other (``pareto.py``: a pad only for methods with a prompt,
one sparsity range per kind of method) returns instead a define-by-run space, an object that
asks an Optuna trial for its parameters and lists the corners a preflight validates.

Presets: ``paper`` (ImageNet ResNet-18 -> CIFAR-100 at 224 px, the paper's grids, for a GPU
cluster), ``default`` (the embedded EfficientNet-Lite0 -> Fashion-MNIST, sized for a 2-core CPU)
and ``tiny`` (a random-init tiny ResNet on a few hundred images: seconds per trial, for tests).
"""
from __future__ import annotations

from typing import Any

PRESETS = ("paper", "default", "tiny")


def pick(preset: str, **by_preset: Any) -> Any:
    """``by_preset[preset]`` with an error naming the presets."""
    if preset not in by_preset:
        raise ValueError(f"preset: unknown preset '{preset}'; choose from {', '.join(by_preset)}")
    return by_preset[preset]
