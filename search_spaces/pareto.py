"""Pruning to a budget: the space of ``sweeps/pareto.py``, searched by Optuna's multi-objective
sampler for the accuracy × cost Pareto front.

Axes: the method (the channel methods ``vpns_structured``, ``depgraph``, ``slim``, whose
``sparsity`` is the fraction of channels removed, and the weight methods ``vpns``, ``hydra``,
whose ``sparsity`` is the fraction of weights masked), its sparsity as a range (one range per
kind: the two mean different things, so Optuna learns them as two parameters) and, for the
methods that train a prompt, the pad size. The space is conditional (a pad only where there is a
prompt), so it is a define-by-run :class:`ParetoSpace` rather than a dict of Tune domains.

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


@dataclass(frozen=True)
class ParetoSpace:
    """A define-by-run space: :meth:`define` asks an Optuna trial for its parameters,
    :meth:`config` turns them into Config values. Frozen and module-level, so a pickled searcher
    (``--resume``) restores it."""

    methods: dict[str, dict[str, Any]]          # method -> its own fixed fields
    channel_sparsity: tuple[float, float]       # range of the channel methods' sparsity
    weight_sparsity: tuple[float, float]        # range of the weight methods' sparsity
    pad_sizes: tuple[int, ...]                  # pads of the methods that train a prompt
    label_keys: tuple[str, ...] = field(default=("method", "sparsity", "pad_size"))

    @staticmethod
    def kind(method: str) -> str:
        return "channel" if METHODS.get(method).structured else "weight"

    def define(self, trial) -> None:
        """Ask ``trial`` (an Optuna trial) for this space's parameters: ``method``, then
        ``channel_sparsity`` or ``weight_sparsity``, then ``pad_size`` if the method has a prompt."""
        method = trial.suggest_categorical("method", list(self.methods))
        kind = self.kind(method)
        trial.suggest_float(f"{kind}_sparsity", *getattr(self, f"{kind}_sparsity"))
        if METHODS.get(method).uses_prompt and len(self.pad_sizes) > 1:
            trial.suggest_categorical("pad_size", list(self.pad_sizes))

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's parameters -> Config values (``channel_sparsity`` -> ``sparsity``, the
        method's own fields added, the pad fixed where only one is listed)."""
        method = params["method"]
        values = {"method": method, **self.methods[method],
                  "sparsity": round(float(params[f"{self.kind(method)}_sparsity"]), 4)}
        if METHODS.get(method).uses_prompt:
            values["pad_size"] = params.get("pad_size", self.pad_sizes[0])
        return values

    def corners(self) -> list[dict[str, Any]]:
        """Config values at the ends of every range, for every method and pad: what a preflight
        validates before any trial runs."""
        out = []
        for method in self.methods:
            kind = self.kind(method)
            pads = self.pad_sizes if METHODS.get(method).uses_prompt else self.pad_sizes[:1]
            for sparsity in getattr(self, f"{kind}_sparsity"):
                for pad in pads:
                    out.append(self.config({"method": method, f"{kind}_sparsity": sparsity,
                                            "pad_size": pad}))
        return out


def base(preset: str) -> dict:
    """The structured sweep's task (its preset), every trial timed for the cost record."""
    extra = pick(preset, paper={}, default={"measure_repeats": 5}, tiny={"measure_repeats": 2})
    return {**structured.base(preset), **extra}


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
    )


def dense_reference(preset: str) -> dict:
    """The reference point of the figure: dense fine-tuning on the same task (its own phase)."""
    return {"method": [n for n in METHODS.names() if not METHODS.get(n).prunes]}


def samples(preset: str) -> int:
    """Optuna trials of the search when ``--num-samples`` is not given."""
    return pick(preset, paper=64, default=32, tiny=4)
