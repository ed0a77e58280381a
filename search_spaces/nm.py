"""N:M study: what the prompt adds under 2:4 semi-structured sparsity, beside 50% unstructured
(issue 30). Arms at each pattern: VPNs, the pad frozen at zero (the same loop and steps), HYDRA
and OMP with as many updates (``matched_updates``); seeds as the preset's. The figure tests VPNs
against each control at each pattern, paired by seed, Holm over the six comparisons."""
from __future__ import annotations

from search_spaces import base as _base, pick
from search_spaces.pad_size import frozen

PATTERNS = {"2:4": {"pattern": "2:4", "sparsity": 0.5},
            "unstructured 50%": {"pattern": "unstructured", "sparsity": 0.5}}
METHODS = {"vpns": {"method": "vpns"}, "frozen pad": {"method": "vpns", **frozen()},
           "hydra": {"method": "hydra", "prompt": "none", "pad_size": 0},
           "omp": {"method": "omp", "prompt": "none", "pad_size": 0}}
#: (arm, control) pairs the figure tests at each pattern
COMPARISONS = [("vpns", "frozen pad"), ("vpns", "hydra"), ("vpns", "omp")]


def base(preset: str) -> dict:
    # every arm takes the same updates: stages without the prompt run twice under reference
    return {**_base.base(preset), "matched_updates": True,
            **pick(preset, paper={}, default={}, tiny={"pad_size": 4})}


def space(preset: str) -> dict:
    def arm(m: dict) -> dict:
        return {k: v for k, v in m.items() if not (k == "pad_size" and preset == "tiny" and v == 8)}
    return {"pattern_arm": {f"{p} · {name}": {**PATTERNS[p], **arm(m)}
                            for p in PATTERNS for name, m in METHODS.items()}}
