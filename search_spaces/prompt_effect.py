"""What drives the prompt's effect at CPU scale: VPNs against HYDRA under controlled changes.

Each phase is a set of named settings on the embedded task (ImageNet EfficientNet-Lite0 ->
Fashion-MNIST, 2,400 training images of which 240 validation, 1,000 test images, 90% sparsity
with ERK allocation, 2 + 2 epochs, mask lr 1e-2, a 32 px image in a 64 px frame with the 8 px
pad prompt on the frame), run at every seed:

- ``inert``: VPNs with prompt learning rates of 1e-30 must equal HYDRA (no bug in the prompted
  path: under the paper schedule the two are the same computation);
- ``protocol``: the paper schedule, the authors' two-step loop (``reference``), the prompt only
  in mask finding, and HYDRA under the reference loop at its own and at VPNs' number of updates;
- ``geometry``: the prompt over a 64 px image against around a 32 px image in a 64 px frame, at
  equal prompt parameter count (pad 8 of 64 px in both);
- ``sparsity``: 99% against 90%;
- ``lr``: the authors' mask learning rate 1e-4 at this budget (reference loop);
- ``budget``: 4x the epochs (8 + 8) at a quarter of the mask learning rate;
- ``claims``: the prompt only in weight tuning, a 48 px image (pad 8 then lies exactly on the
  frame), and fix / random prompts with as many tunable values as the pad (a 42 px square).
"""
from __future__ import annotations

from search_spaces import base as _base, pick

AROUND = _base.layout("around_image", output_size=64, pad_size=8, input_size=32)
OVER = _base.layout("over_image", output_size=64, pad_size=8)
INERT = {"mask_prompt_lr": 1e-30, "tune_prompt_lr": 1e-30}
TWICE = {"mask_epochs": 4, "tune_epochs": 4}  # HYDRA with the reference VPNs' number of updates

PHASES = {
    "inert": {
        "hydra": {"method": "hydra"},
        "vpns": {"method": "vpns"},
        "vpns_inert_prompt": {"method": "vpns", **INERT},
    },
    "protocol": {
        "vpns_reference": {"method": "vpns", "schedule": "reference"},
        "hydra_reference": {"method": "hydra", "schedule": "reference"},
        "hydra_reference_2x_updates": {"method": "hydra", "schedule": "reference", **TWICE},
        "vpns_mask_stage_only": {"method": "vpns", "vp_stages": "mask"},
    },
    "geometry": {
        "vpns_over_image": {"method": "vpns", **OVER},
        "hydra_over_image": {"method": "hydra", **OVER},
    },
    "sparsity": {
        "vpns_99": {"method": "vpns", "sparsity": 0.99},
        "hydra_99": {"method": "hydra", "sparsity": 0.99},
    },
    "lr": {
        "vpns_reference_lr1e-4": {"method": "vpns", "schedule": "reference", "mask_lr": 1e-4},
        "hydra_reference_2x_updates_lr1e-4": {"method": "hydra", "schedule": "reference",
                                              "mask_lr": 1e-4, **TWICE},
    },
    "claims": {  # the paper's other claims at this budget (README, Reproduction status)
        "vpns_tune_stage_only": {"method": "vpns", "vp_stages": "tune"},
        "vpns_input48": {"method": "vpns", "input_size": 48},
        "vpns_fix_prompt": {"method": "vpns", "prompt": "fix"},
        "vpns_random_prompt": {"method": "vpns", "prompt": "random"},
    },
    "budget": {
        "vpns_4x_steps_quarter_lr": {"method": "vpns", "mask_epochs": 8, "tune_epochs": 8,
                                     "mask_lr": 2.5e-3},
        "hydra_4x_steps_quarter_lr": {"method": "hydra", "mask_epochs": 8, "tune_epochs": 8,
                                      "mask_lr": 2.5e-3},
    },
}

TINY_PHASES = {"inert": {"hydra": {"method": "hydra"},
                         "vpns_inert_prompt": {"method": "vpns", **INERT}},
               "protocol": {"vpns_reference": {"method": "vpns", "schedule": "reference"}}}


def base(preset: str) -> dict:
    return {**_base.base(preset), **pick(preset, paper={}, default=AROUND, tiny={})}


def phases(preset: str) -> dict[str, dict[str, dict]]:
    """Phase name -> {setting label: config changes}, in the order they run."""
    return pick(preset, paper={"inert": PHASES["inert"], "protocol": PHASES["protocol"]},
                default=PHASES, tiny=TINY_PHASES)
