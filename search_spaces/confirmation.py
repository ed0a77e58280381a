"""The pre-registered confirmation of the prompt's effect (README, "Confirmation"; issue 26).

Frozen before the run: the embedded default (``search_spaces/base.py`` DEFAULT: EfficientNet-Lite0
-> Fashion-MNIST, the authors' two-step loop and layout, 64 px, pad 8, ERK, 2 + 2 epochs, mask lr
1e-2), on a training and test subset no earlier run used (``data_seed`` 1; every exploratory run
used 0) and ten seeds none of which chose anything (not 7, 9 or 17). Five arms; the hypotheses are
paired comparisons of test accuracy without the prompt (the reference schedule's headline):

- H1: ``pad8`` against ``pad8_frozen`` at 90% (what learning the prompt adds);
- H2: ``pad8_99`` against ``pad8_frozen_99`` at 99% sparsity;
- H3: ``pad8`` against ``none_matched`` at 90% (VPNs against no prompt with as many updates).
"""
from __future__ import annotations

from search_spaces import base as _base, pick
from search_spaces.pad_size import MATCHED_NONE, frozen

DATA_SEED = 1  # a new training and test subset: every exploratory run used data_seed 0
SEEDS = (101, 102, 103, 104, 105, 106, 107, 108, 109, 110)
#: hypothesis -> (arm, control); analysis/confirmation.py tests exactly these, Holm over all three
HYPOTHESES = {"H1": ("pad8", "pad8_frozen"), "H2": ("pad8_99", "pad8_frozen_99"),
              "H3": ("pad8", "none_matched")}
ARMS = {
    "pad8": {"pad_size": 8},
    "pad8_frozen": frozen(8),
    "none_matched": MATCHED_NONE,
    "pad8_99": {"pad_size": 8, "sparsity": 0.99},
    "pad8_frozen_99": {**frozen(8), "sparsity": 0.99},
}


def base(preset: str) -> dict:
    return {**_base.base(preset), **pick(preset, paper={}, default={"data_seed": DATA_SEED},
                                         tiny={"data_seed": DATA_SEED, "schedule": "reference"})}


def space(preset: str) -> dict:
    return {"arm": ARMS}


def seeds(preset: str) -> tuple[int, ...]:
    return pick(preset, paper=SEEDS, default=SEEDS, tiny=(101,))  # tiny: the tests' smoke run
