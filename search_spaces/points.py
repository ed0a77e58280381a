"""Points of a search space, without Ray: named points resolved to Config values, every
combination of the listed axes, their validation and the grid's run order.

An axis (see :mod:`search_spaces`) is a list of field values, a dict of *named points*
(``{label: {field: value, ...}}``), or a Tune domain such as ``tune.loguniform(...)``. This
module never imports Ray: a Tune domain can only exist once Ray's sampling module is loaded,
so :func:`is_domain` looks for it in ``sys.modules`` instead.
"""
from __future__ import annotations

import itertools
import sys
from typing import Any

from vpns_core.config import Config

_TUNE_SAMPLE = "ray.tune.search.sample"  # where Tune's ``Domain`` lives


def is_domain(values: Any) -> bool:
    """Whether an axis is a Tune domain (sampled), not a list of values or named points."""
    sample = sys.modules.get(_TUNE_SAMPLE)
    return sample is not None and isinstance(values, sample.Domain)


def named_points(axes: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """The named-point axes of ``axes``: ``{axis: {label: {field: value}}}``."""
    return {k: v for k, v in axes.items() if isinstance(v, dict)}


def resolve(config: dict[str, Any], points: dict[str, dict] | None) -> dict[str, Any]:
    """A Tune config -> Config values: named-point axes (``{"pad": "none"}``) are replaced by
    the fields of their point (``prompt='none', pad_size=0``)."""
    values = dict(config)
    for axis, table in (points or {}).items():
        if axis in values:
            values.update(table[values.pop(axis)])
    return values


def driver_config(values: dict[str, Any]) -> Config:
    """``values`` validated in the driver (values only: a CPU head node drives GPU trials, whose
    device is checked where they run, by :func:`vpns_core.resources.check_resources`)."""
    return Config.from_dict(values)


def listed_axes(axes: dict[str, Any]) -> dict[str, list]:
    """The axes given as lists of values or named points (not Tune domains), as label lists."""
    return {k: list(v) for k, v in axes.items() if not is_domain(v)}


def point_configs(fixed: dict[str, Any], axes: dict[str, Any],
                  points: dict[str, dict]) -> list[dict[str, Any]]:
    """Config values for every combination of the discrete axes (Tune domains left at the base)."""
    discrete = listed_axes(axes)
    combos = []
    for values in itertools.product(*discrete.values()):
        combos.append(resolve({**fixed, **dict(zip(discrete, values))}, points))
    return combos


def longest_first(fixed: dict[str, Any], axes: dict[str, Any],
                  points: dict[str, dict]) -> dict[str, Any]:
    """The grid's run order: each listed axis's values by the most epochs a trial with that
    value trains, longest first (ties keep the space's order). Trials of the sparsity curves
    train 2 to 13 epochs; started last, the 13-epoch LTH trials left a core idle for minutes at
    the end of the sweep."""
    discrete = listed_axes(axes)
    cost = {k: dict.fromkeys(v, 0) for k, v in discrete.items()}
    for values in itertools.product(*discrete.values()):
        epochs = driver_config(resolve({**fixed, **dict(zip(discrete, values))}, points)).total_epochs
        for key, label in zip(discrete, values):
            cost[key][label] = max(cost[key][label], epochs)
    return {k: sorted(v, key=lambda label, k=k: -cost[k][label]) if k in discrete else v
            for k, v in axes.items()}


def check_points(fixed: dict[str, Any], axes: dict[str, Any]) -> None:
    """Validate every discrete point before any trial starts (errors name the field); Tune
    domains are checked with one sample."""
    samples = {k: v.sample() for k, v in axes.items() if is_domain(v)}
    for values in point_configs(fixed, axes, named_points(axes)):
        driver_config({**values, **samples})
