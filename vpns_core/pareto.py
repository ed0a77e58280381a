"""Objectives, budgets and Pareto ranks of a multi-objective pruning search (no Ray, no MLflow).

A search maximises the validation accuracy of the selected epoch (:data:`ACCURACY`) and minimises
one or two costs of :data:`COSTS`, each a key of a trial's final report (the cost record,
:func:`vpns_core.costs.cost_record`). A :class:`Budget` caps costs (``latency_ms=40``); a trial
fits when every capped cost is at most its cap.

Ranks follow constrained domination (Deb et al. 2002, NSGA-II): the trials that fit the budget
are sorted into non-dominated fronts first (rank 1 = the Pareto front of the trials that fit),
then the others among themselves, after them. Without a budget every trial fits. The sweep
(``sweeps/pareto.py``), the figure (``analysis/pareto.py``) and ``python -m vpns_core.pick`` share
these functions, so they agree on which trial is where.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the accuracy every search maximises: validation accuracy at the selected epoch (never test)
ACCURACY = "selected_val_acc"


@dataclass(frozen=True)
class Cost:
    name: str
    unit: str
    label: str


#: costs a search can minimise or a budget can cap (keys of a trial's cost record)
COSTS = {c.name: c for c in (
    Cost("latency_ms", "ms", "latency (median of the timed runs at latency_batch, on the trial's device; "
                             "the Pareto sweep re-times each candidate alone after training)"),
    Cost("latency_cpu_ms", "ms", "CPU time of a pass at latency_batch (one-thread CPU trials): "
                                 "the latency with the core to itself"),
    Cost("params_m", "M", "parameters in millions (nonzero weights for weight masks)"),
    Cost("flops_g", "GFLOPs", "FLOPs per image on dense kernels"),
)}
#: a search minimises at most this many costs beside the accuracy
MAX_COSTS = 2
DEFAULT_OBJECTIVES = ("latency_ms",)


def _items(values: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blank entries dropped)."""
    values = [values] if isinstance(values, str) else list(values)
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def parse_objectives(values: str | Sequence[str]) -> tuple[str, ...]:
    """The costs a search minimises beside the accuracy, e.g. ``"latency_ms,params_m"``.

    Raises:
        ValueError: an unknown cost (the message lists the allowed ones), a cost named twice,
            none, or more than :data:`MAX_COSTS`.
    """
    names = [n for n in _items(values) if n != ACCURACY and n != "val_acc"]  # accuracy is implied
    allowed = ", ".join(COSTS)
    for name in names:
        if name not in COSTS:
            raise ValueError(f"unknown cost '{name}'; choose one or two of {allowed} "
                             f"(validation accuracy is always maximised)")
    if len(set(names)) != len(names):
        raise ValueError(f"a cost is named twice ({', '.join(names)})")
    if not names:
        raise ValueError(f"name one or two costs to minimise, from {allowed}")
    if len(names) > MAX_COSTS:
        raise ValueError(f"at most {MAX_COSTS} costs beside the accuracy (got {', '.join(names)})")
    return tuple(names)


@dataclass(frozen=True)
class Budget:
    """Caps on costs: ``limits`` is ``((cost, cap), ...)``; empty = everything fits."""

    limits: tuple[tuple[str, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.limits)

    @property
    def text(self) -> str:
        """``"latency_ms<=40, params_m<=1.5"`` (``""`` for no budget)."""
        return ", ".join(f"{name}<={cap:g}" for name, cap in self.limits)

    @property
    def spec(self) -> str:
        """The flag value that parses back to this budget, ``"latency_ms=40,params_m=1.5"``."""
        return ",".join(f"{name}={cap:g}" for name, cap in self.limits)

    def violations(self, costs: Mapping[str, Any]) -> dict[str, float]:
        """Per capped cost, its relative excess ``(value - cap) / cap``: <= 0 fits (Optuna's
        constraint convention). A missing or non-numeric value counts as ``inf`` (not known to
        fit)."""
        out = {}
        for name, cap in self.limits:
            value = _number(costs.get(name))
            out[name] = math.inf if value is None else (value - cap) / cap
        return out

    def fits(self, costs: Mapping[str, Any]) -> bool:
        return all(v <= 0 for v in self.violations(costs).values())

    def excess(self, costs: Mapping[str, Any]) -> float:
        """Sum of the positive relative excesses: 0 when it fits; how far it is from fitting."""
        return sum(max(0.0, v) for v in self.violations(costs).values())


def parse_budget(values: str | Sequence[str] | None) -> Budget:
    """``"latency_ms=40"``, ``"latency_ms=40,params_m=1.5"`` or a list of such (a repeated flag).

    Raises:
        ValueError: not ``COST=NUMBER``, an unknown cost (the message lists the allowed ones), a
            cap that is not a positive finite number, or a cost capped twice.
    """
    limits: dict[str, float] = {}
    for item in _items(values or []):
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise ValueError(f"'{item}': expected COST=NUMBER, e.g. latency_ms=40, with COST one "
                             f"of {', '.join(COSTS)}")
        if name not in COSTS:
            raise ValueError(f"'{item}': unknown cost '{name}'; choose from {', '.join(COSTS)}")
        try:
            cap = float(text)
        except ValueError:
            raise ValueError(f"'{item}': the cap must be a number (in {COSTS[name].unit})") from None
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"'{item}': the cap must be a positive number (in {COSTS[name].unit})")
        if name in limits:
            raise ValueError(f"'{item}': {name} is capped twice")
        limits[name] = cap
    return Budget(tuple(limits.items()))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_ranks(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Rank of each point by non-dominated sorting: 1 for the points no other point dominates,
    2 for those only rank-1 points dominate, and so on (equal points share a rank).
    ``maximize[i]`` says whether objective ``i`` is maximised. O(n²) per front: fine for the
    hundreds of trials a sweep has."""
    signed = [[-v if up else v for v, up in zip(p, maximize)] for p in points]
    ranks = [0] * len(signed)
    left = set(range(len(signed)))
    rank = 0
    while left:
        rank += 1
        front = {i for i in left if not any(dominates(signed[j], signed[i]) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
    return ranks


def objective_values(row: Mapping[str, Any], costs: Sequence[str]) -> list[float] | None:
    """``[accuracy, cost, ...]`` of a trial's row, or None when one of them is missing."""
    values = [_number(row.get(name)) for name in (ACCURACY, *costs)]
    return None if any(v is None for v in values) else values


def pareto_ranks(rows: Sequence[Mapping[str, Any]], costs: Sequence[str],
                 budget: Budget = Budget()) -> list[int | None]:
    """Constrained Pareto rank of each row (a trial's final metrics): the rows that fit
    ``budget`` ranked among themselves (1 = their front), then the others after them. None for a
    row that lacks an objective (a failed or stopped trial)."""
    maximize = [True] + [False] * len(costs)
    values = [objective_values(row, costs) for row in rows]
    ranks: list[int | None] = [None] * len(rows)
    offset = 0
    for fits in (True, False):
        group = [i for i, v in enumerate(values) if v is not None and budget.fits(rows[i]) == fits]
        group_ranks = non_dominated_ranks([values[i] for i in group], maximize)
        for i, r in zip(group, group_ranks):
            ranks[i] = r + offset
        offset += max(group_ranks, default=0)
    return ranks


def closest(rows: Sequence[Mapping[str, Any]], budget: Budget) -> int | None:
    """Index of the row nearest to fitting ``budget`` (smallest summed relative excess; then the
    higher accuracy), among rows with a known accuracy; None if there is none."""
    known = [i for i, row in enumerate(rows) if _number(row.get(ACCURACY)) is not None]
    return min(known, key=lambda i: (budget.excess(rows[i]), -_number(rows[i].get(ACCURACY))),
               default=None)
