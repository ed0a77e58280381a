"""Pruning to a budget: the space of ``sweeps/pareto.py``, searched by Optuna's multi-objective
sampler for the accuracy × cost Pareto front.

Axes: the method (the channel methods ``vpns_structured``, ``depgraph``, ``slim``, whose
``sparsity`` is the fraction of channels removed, and the weight methods ``vpns``, ``hydra``,
whose ``sparsity`` is the fraction of weights masked), for a weight method its ``pattern``
(unstructured, or 2:4 semi-structured: exactly 2 of every 4 weights kept, so its sparsity is
0.5, issue 30), its sparsity as a range (one range per kind: the two mean different things, so
Optuna learns them as two parameters) and, for the methods that train a prompt, the pad size.
The space is conditional (a pad only where there is a prompt, a sparsity range only where the
pattern does not fix it), so it is a define-by-run :class:`ParetoSpace` rather than a dict of
Tune domains.

Every trial records its cost (``cost_record``): the front is drawn from it, and the sweep re-times
each candidate's export once training is over (``sweeps/multiobjective.py``).

Default preset: the task of ``sweeps/structured.py`` (``base.SMALL``: 1,500 / 500 images, 32 px in
a 48 px frame, 2 + 2 epochs, Slimming and DepGraph with one warm-up epoch), so that its fixed
sparsities and this front can be compared point for point; channel sparsity 10-75 %, weight
sparsity 50-98 %, pads 4, 6, 8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vpns_core.methods import METHODS

from search_spaces import pick, structured

#: the searched methods and the settings each brings (Slimming and DepGraph train one warm-up
#: epoch with their penalty before the channels go, as in the structured sweep)
CHANNEL_METHODS = ("vpns_structured", "depgraph", "slim")
WEIGHT_METHODS = ("vpns", "hydra")
#: the weight methods' patterns: unstructured masks, or 2:4 (the pattern sparse tensor cores run)
PATTERNS = ("unstructured", "2:4")


@dataclass(frozen=True)
class ParetoSpace:
    """A define-by-run space: :meth:`define` asks an Optuna trial for its parameters,
    :meth:`config` turns them into Config values. Frozen and module-level, so a pickled searcher
    (``--resume``) restores it."""

    methods: dict[str, dict[str, Any]]          # method -> its own fixed fields
    channel_sparsity: tuple[float, float]       # range of the channel methods' sparsity
    weight_sparsity: tuple[float, float]        # range of the weight methods' sparsity
    pad_sizes: tuple[int, ...]                  # pads of the methods that train a prompt
    #: weight patterns: "unstructured" (sparsity from ``weight_sparsity``) and N:M ones (their
    #: sparsity fixed at 1 - N/M)
    patterns: tuple[str, ...] = ("unstructured",)
    label_keys: tuple[str, ...] = field(default=("method", "pattern", "sparsity", "pad_size"))

    @staticmethod
    def kind(method: str) -> str:
        return "channel" if METHODS.get(method).structured else "weight"

    @staticmethod
    def pattern_sparsity(pattern: str) -> float | None:
        """The sparsity an N:M ``pattern`` fixes (``"2:4"`` -> 0.5); None for unstructured."""
        if pattern == "unstructured":
            return None
        n, m = (int(part) for part in pattern.split(":"))
        return 1 - n / m

    def define(self, trial) -> None:
        """Ask ``trial`` (an Optuna trial) for its parameters: ``method``; for a weight method its
        ``pattern`` (when more than one is listed); ``channel_sparsity`` or ``weight_sparsity``
        unless the pattern fixes it; then ``pad_size`` if the method has a prompt."""
        method = trial.suggest_categorical("method", list(self.methods))
        kind = self.kind(method)
        pattern = "unstructured"
        if kind == "weight" and len(self.patterns) > 1:
            pattern = trial.suggest_categorical("pattern", list(self.patterns))
        elif kind == "weight":
            pattern = self.patterns[0]
        if self.pattern_sparsity(pattern) is None:
            trial.suggest_float(f"{kind}_sparsity", *getattr(self, f"{kind}_sparsity"))
        if METHODS.get(method).uses_prompt and len(self.pad_sizes) > 1:
            trial.suggest_categorical("pad_size", list(self.pad_sizes))

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's parameters -> Config values (``channel_sparsity`` -> ``sparsity``, or the
        N:M pattern's own sparsity with ``pattern``; the method's own fields added, the pad fixed
        where only one is listed)."""
        method = params["method"]
        kind = self.kind(method)
        pattern = params.get("pattern", self.patterns[0]) if kind == "weight" else "unstructured"
        fixed = self.pattern_sparsity(pattern)
        values = {"method": method, **self.methods[method],
                  "sparsity": round(float(params[f"{kind}_sparsity"]) if fixed is None else fixed, 4)}
        if pattern != "unstructured":
            values["pattern"] = pattern
        if METHODS.get(method).uses_prompt:
            values["pad_size"] = params.get("pad_size", self.pad_sizes[0])
        return values

    def corners(self) -> list[dict[str, Any]]:
        """Config values at the ends of every range, for every method, pattern and pad: what a
        preflight validates before any trial runs."""
        out = []
        for method in self.methods:
            kind = self.kind(method)
            pads = self.pad_sizes if METHODS.get(method).uses_prompt else self.pad_sizes[:1]
            patterns = self.patterns if kind == "weight" else ("unstructured",)
            for pattern in patterns:
                ends = getattr(self, f"{kind}_sparsity") if self.pattern_sparsity(pattern) is None else (None,)
                for sparsity in ends:
                    for pad in pads:
                        out.append(self.config({"method": method, "pattern": pattern,
                                                f"{kind}_sparsity": sparsity, "pad_size": pad}))
        return out


def base(preset: str) -> dict:
    """The structured sweep's task (its preset), every trial measured for the cost record."""
    extra = pick(preset, paper={}, default={"measure_repeats": 5}, tiny={"measure_repeats": 2})
    return {**structured.base(preset), **extra, "cost_record": True}


def space(preset: str) -> ParetoSpace:
    methods = {name: dict(structured.METHOD_SETTINGS.get(name, {}))
               for name in CHANNEL_METHODS + WEIGHT_METHODS}
    if preset == "tiny":  # seconds per trial: no warm-up epochs
        methods = {name: {} for name in methods}
    return ParetoSpace(
        methods=methods,
        channel_sparsity=pick(preset, paper=(0.1, 0.9), default=(0.1, 0.75), tiny=(0.2, 0.8)),
        weight_sparsity=pick(preset, paper=(0.5, 0.99), default=(0.5, 0.98), tiny=(0.5, 0.95)),
        pad_sizes=pick(preset, paper=(8, 16, 24, 32), default=(4, 6, 8), tiny=(2, 4)),
        patterns=PATTERNS,
    )


def dense_reference(preset: str) -> dict:
    """The reference point of the figure: dense fine-tuning on the same task (its own phase)."""
    return {"method": [n for n in METHODS.names() if not METHODS.get(n).prunes]}


def samples(preset: str) -> int:
    """Optuna trials of the search when ``--num-samples`` is not given."""
    return pick(preset, paper=64, default=32, tiny=4)
