"""Channel (structured) pruning: channel sparsity × method (structured VPNs, Network Slimming,
DepGraph), each a named point so that a method's own settings travel with it.

Default preset: the embedded Lite0 -> Fashion-MNIST task at the small size of the sparsity
curves (``base.SMALL``: 1,500 training / 500 test images, 32 px in a 48 px frame), channel
sparsities 30 / 50 / 70 % of every dependency group. Structured VPNs
runs 2 epochs of scores + prompt and 2 of fine-tuning; Slimming and DepGraph run 1 epoch of
sparse training (their regularisers) and 2 of fine-tuning.
"""
from __future__ import annotations

from vpns_core.methods import METHODS

from search_spaces import base as _base, pick

#: per-method settings of the channel methods (a method not listed runs with the base config)
METHOD_SETTINGS = {"vpns_structured": {}, "slim": {"warmup_epochs": 1}, "depgraph": {"warmup_epochs": 1}}


def methods() -> dict[str, dict]:
    names = [n for n in METHODS.names() if METHODS.get(n).structured]
    return {n: {"method": n, **METHOD_SETTINGS.get(n, {})} for n in names}


def base(preset: str) -> dict:
    """The preset's task with the cost record on: the figure reads every trial's dense-vs-pruned
    measurements (:func:`vpns_core.costs.compare`) and ``flops_g``."""
    extra = pick(preset, paper={"channel_allocation": "layerwise"},
                 default={**_base.SMALL, "channel_allocation": "layerwise"},
                 tiny={"channel_allocation": "layerwise", "measure_repeats": 1})
    return {**_base.base(preset), **extra, "cost_record": True}


def levels(preset: str) -> list[float]:
    return pick(preset, paper=[0.3, 0.5, 0.7, 0.9], default=[0.3, 0.5, 0.7], tiny=[0.5])


def space(preset: str) -> dict:
    return {"channel_method": methods(), "sparsity": levels(preset)}
