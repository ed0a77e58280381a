"""The fixed trial configuration of each preset; the axis modules override a few fields."""
from __future__ import annotations

import os
from pathlib import Path

from search_spaces import pick

PROJECT = Path(__file__).resolve().parents[1]

LAYOUTS = ("over_image", "around_image")


def layout(kind: str, *, output_size: int, pad_size: int, input_size: int | None = None) -> dict:
    """The sizes of a named pad-prompt layout, so that every preset states its choice
    (``Config.layout`` derives the same name back from the sizes):

    - ``over_image``: the image fills the frame (input = output) and the prompt overlays its
      outer ``pad_size`` pixels: the authors' default (pad 16 on 224 px, 26% of the pixels);
    - ``around_image``: the image is shrunk to ``input_size`` inside a zero frame and the
      prompt lies on the frame only (``pad_size`` at most the border).
    """
    if kind == "over_image":
        if input_size not in (None, output_size):
            raise ValueError(f"layout over_image: input_size must equal output_size={output_size}, "
                             f"got {input_size}")
        return dict(input_size=output_size, output_size=output_size, pad_size=pad_size)
    if kind == "around_image":
        if input_size is None or not 0 < input_size < output_size:
            raise ValueError(f"layout around_image: needs input_size < output_size={output_size}, "
                             f"got {input_size}")
        border = (output_size - input_size) // 2
        if pad_size > border:
            raise ValueError(f"layout around_image: pad_size {pad_size} exceeds the {border} px "
                             f"border of a {input_size} px image in a {output_size} px frame")
        return dict(input_size=input_size, output_size=output_size, pad_size=pad_size)
    raise ValueError(f"layout: unknown layout {kind!r}; choose from {', '.join(LAYOUTS)}")


# The reference code's seeds (MISSION.md): a claim carries its seed noise, so the default preset
# runs all three too (``--seeds 7`` for a quick one-seed look); the tiny preset (tests) one.
SEEDS = {"paper": (7, 9, 17), "default": (7, 9, 17), "tiny": (7,)}

# ImageNet ResNet-18 -> CIFAR-100 at 224 px with the authors' code (MISSION.md, checked against
# their main.py): their two-step loop evaluated without the prompt (schedule "reference"), the
# prompt over the image's outer 16 px, 30 + 30 epochs, Adam 1e-4 for scores and prompt, SGD 0.01
# for weights, batch 256, one global threshold over every conv and linear layer, the classifier
# included (prune_head), frequency label mapping on the kept 1000-way head from the whole
# training split, fp32 (no AMP: they train without it). Model selection stays on a validation
# split (theirs keeps the last epoch's model; its "best" accuracy is read on the test set).
PAPER = dict(
    model="resnet18", pretrained=True, dataset="cifar100",
    data_root=os.environ.get("VPNS_DATA_ROOT", str(PROJECT / "data")),
    train_subset=None, test_subset=None, val_fraction=0.1, label_mapping_samples=None,
    **layout("over_image", output_size=224, pad_size=16), prompt="pad", vp_stages="both",
    schedule="reference",
    method="vpns", sparsity=0.9, allocation="global", head="flm", prune_head=True, amp=False,
    mask_epochs=30, tune_epochs=30, mask_lr=1e-4, tune_lr=0.01, batch_size=256,
    eval_batch_size=512, num_workers=4,
)

# The embedded default: ImageNet EfficientNet-Lite0 -> Fashion-MNIST at 90% sparsity, 2,400
# training images with 240 validation images drawn beside them, 1,000 test images, 2 + 2 epochs:
# the authors' loop (schedule "reference": a prompted step on an unaugmented batch, then an
# unprompted augmented step, evaluated without the prompt) in the authors' layout (the prompt
# over the image's border, input = output = 64 px). It departs from them on purpose: ERK
# allocation (Lite0 collapses to chance at 90% under one global threshold), mask lr 1e-2 for
# 2 + 2 epochs (theirs 1e-4 for 30 + 30), pad 8 of 64 px covering 44% of the pixels (theirs 26%).
# It was chosen in the README's exploratory investigation as the setting with the largest
# (VPNs - HYDRA) / seed std, on the same seeds and test images that table reports: its gaps there
# are biased upward; the pre-registered confirmation (search_spaces/confirmation.py) is not.
DEFAULT = dict(
    sparsity=0.9, allocation="erk",
    train_subset=2400, test_subset=1000, val_fraction=0.1,
    mask_epochs=2, tune_epochs=2, schedule="reference",
    **layout("over_image", output_size=64, pad_size=8),
)

# The embedded task made smaller for the widest sweeps (every method x 3 sparsities; channel
# methods with their dense-vs-pruned measurements): 1,500 training (150 of them validation) and
# 500 test images, a 32 px image in a 48 px frame (the 8 px pad prompt covers exactly the zero
# padding; 0.56x the pixels of the 64 px frame), under the paper schedule (the reference loop
# feeds its unprompted step the bare 32 px image there, which the investigation found unstable).
SMALL = dict(train_subset=1500, test_subset=500, schedule="paper",
             **layout("around_image", output_size=48, pad_size=8, input_size=32))

# A random-init CIFAR-style tiny ResNet on 128 Fashion-MNIST images: a trial takes seconds.
TINY = dict(
    model="tiny_resnet", pretrained=False, dataset="fashion_mnist", train_subset=128,
    test_subset=64, val_fraction=0.25, **layout("around_image", output_size=32, pad_size=4, input_size=24),
    batch_size=32, eval_batch_size=64, mask_epochs=1, tune_epochs=1, sparsity=0.8,
    label_mapping_samples=64, mask_lr=0.05, tune_lr=0.05,
    measure_repeats=1, latency_batch=8,  # where a sweep turns the cost record on: one timed pass, small batch
)


def base(preset: str) -> dict:
    """A copy of the preset's fixed config values (fields not named keep Config's defaults)."""
    return dict(pick(preset, paper=PAPER, default=DEFAULT, tiny=TINY))


def seeds(preset: str) -> tuple[int, ...]:
    return pick(preset, **SEEDS)
