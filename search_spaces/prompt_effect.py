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
- ``authors``: the reference loop in the authors' layout (the prompt over a 64 px image), where
  the unprompted step sees the same image size as the prompted one (around a 32 px image it
  sees the bare 32 px image), against HYDRA with as many updates;
- ``lr``: the authors' mask learning rate 1e-4 at this budget, in their loop and layout;
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
OVER32 = _base.layout("over_image", output_size=32, pad_size=4)
FOURFOLD = {"mask_epochs": 8, "tune_epochs": 8, "mask_lr": 2.5e-3}  # 4x the steps, 1/4 of the lr
AUTHORS_VPNS = {"method": "vpns", "schedule": "reference", **OVER}
AUTHORS_HYDRA = {"method": "hydra", "schedule": "reference", **OVER, **TWICE}

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
    "authors": {  # the authors' loop in the authors' layout (input = output: the unprompted
        # step and the evaluation see the same 64 px image the prompted step frames)
        "vpns_reference_over_image": {"method": "vpns", "schedule": "reference", **OVER},
        "hydra_reference_over_image_2x_updates": {"method": "hydra", "schedule": "reference",
                                                  **OVER, **TWICE},
    },
    "checks": {  # controls of the authors' phase: the same loop with a prompt that cannot move
        # (its prompted step is then only an extra unaugmented step), and a 32 px image
        "vpns_reference_over_image_inert_prompt": {"method": "vpns", "schedule": "reference",
                                                   **OVER, **INERT},
        "vpns_reference_over_image32": {"method": "vpns", "schedule": "reference", **OVER32},
        "hydra_reference_over_image32_2x_updates": {"method": "hydra", "schedule": "reference",
                                                    **OVER32, **TWICE},
    },
    "small": {  # a cheaper geometry (the prompt over a 32 px image, pad 4: the same 44% of the
        # input as pad 8 of 64 px) that affords 4x the steps at a quarter of the mask lr
        "vpns_over_image32": {"method": "vpns", **OVER32},
        "hydra_over_image32": {"method": "hydra", **OVER32},
        "vpns_over_image32_4x_steps_quarter_lr": {"method": "vpns", **OVER32, **FOURFOLD},
        "hydra_over_image32_4x_steps_quarter_lr": {"method": "hydra", **OVER32, **FOURFOLD},
    },
    "lr": {  # the authors' mask learning rate, in their loop and layout
        "vpns_reference_over_image_lr1e-4": {"method": "vpns", "schedule": "reference",
                                             "mask_lr": 1e-4, **OVER},
        "hydra_reference_over_image_2x_updates_lr1e-4": {"method": "hydra", "schedule": "reference",
                                                         "mask_lr": 1e-4, **OVER, **TWICE},
    },
    "sparsity": {  # 99% against 90%, in the authors' loop and layout
        "vpns_reference_over_image_99": {**AUTHORS_VPNS, "sparsity": 0.99},
        "hydra_reference_over_image_2x_updates_99": {**AUTHORS_HYDRA, "sparsity": 0.99},
    },
    "claims": {  # the paper's other claims, in the authors' loop and layout
        "vpns_reference_over_image_mask_stage_only": {**AUTHORS_VPNS, "vp_stages": "mask"},
        "vpns_reference_over_image_tune_stage_only": {**AUTHORS_VPNS, "vp_stages": "tune"},
        "vpns_reference_over_image_fix_prompt": {**AUTHORS_VPNS, "prompt": "fix"},
        "vpns_reference_over_image_random_prompt": {**AUTHORS_VPNS, "prompt": "random"},
    },
}

TINY_PHASES = {"inert": {"hydra": {"method": "hydra"},
                         "vpns_inert_prompt": {"method": "vpns", **INERT}},
               "protocol": {"vpns_reference": {"method": "vpns", "schedule": "reference"}}}


def base(preset: str) -> dict:
    # The investigation's base is the earlier default (paper schedule, a 32 px image in a 64 px
    # frame); every setting names what it changes.
    return {**_base.base(preset), **pick(preset, paper={}, default={**AROUND, "schedule": "paper"},
                                         tiny={"schedule": "paper"})}


def phases(preset: str) -> dict[str, dict[str, dict]]:
    """Phase name -> {setting label: config changes}, in the order they run."""
    return pick(preset, paper={"inert": PHASES["inert"], "protocol": PHASES["protocol"]},
                default=PHASES, tiny=TINY_PHASES)
