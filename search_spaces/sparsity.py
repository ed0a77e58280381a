"""Sparsity levels: the reference code's densities 0.6 ... 0.1 on the paper preset.

The default preset's headline (:data:`HEADLINE`: VPNs, HYDRA and OMP at 90%, plus dense) runs on
the preset's own task and protocol. Its full grid (``--full``) runs every registered method (13
with the dense reference) at three sparsities, so each trial is made smaller: 1,500 training
(150 of them validation) and 500 test images, a 32 px image in a 48 px frame (the 8 px pad prompt
covers exactly the zero padding; 0.56x the pixels of the 64 px frame), 2 + 2 epochs, and one
epoch per LTH round (the paper fine-tunes every round fully; LTH at 90% takes 11 rounds, so full
rounds would cost five times a VPNs trial). At the 64 px frame the sweep took about 80 minutes
on this 2-core CPU (measured per epoch); see the README for the measured time of this preset.
"""
from __future__ import annotations

from search_spaces import base as _base, pick

CURVES_DEFAULT = dict(_base.SMALL, lth_epochs_per_round=1)


def base(preset: str, full: bool = True) -> dict:
    """The fixed values: the full grid's smaller task on the default preset (``full``), else
    the preset's own (the headline)."""
    small = pick(preset, paper={}, default=CURVES_DEFAULT, tiny={}) if full else {}
    return {**_base.base(preset), **small}


def levels(preset: str) -> list[float]:
    return pick(preset, paper=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9], default=[0.5, 0.7, 0.9],
                tiny=[0.8])


def space(preset: str) -> dict:
    return {"sparsity": levels(preset)}


#: the headline comparison of the default preset: VPNs, HYDRA and OMP at 90% (``dense`` is its
#: own phase); ``--full`` runs every registered method at every level instead
HEADLINE = {"method": ["vpns", "hydra", "omp"], "sparsity": [0.9]}


def headline(preset: str) -> dict | None:
    """The default grid of ``sweeps/sparsity_curves.py`` (None: the full grid is the default).
    The tiny preset keeps the headline's methods at its own level, so that its smoke test does
    not train every method again (tests/test_methods.py trains each once)."""
    return pick(preset, paper=None, default=dict(HEADLINE), tiny={**HEADLINE, "sparsity": levels("tiny")})
