"""Pad-size ablation: width of the pad prompt's border at a fixed input size, with the two
controls that take the pads' exact updates (issue 26: compare like with like).

- ``frozen``: the pad prompt frozen at zero (``learn_prompt=False``): the same loop, the same
  batches and steps, a prompt that cannot move. Under the reference schedule it isolates what
  *learning* the prompt adds over the extra unaugmented step its loop takes. A zero pad adds
  nothing whatever its width, so one frozen arm serves every pad (8 px, the widest default pad).
- ``none``: no prompt (HYDRA's pipeline) with ``matched_updates``: under the reference schedule
  its stages run twice the epochs, so that it takes as many updates as a pad's two-step
  iterations, each an augmented step as the method defines it; under the paper schedule every
  arm already takes one step per iteration.

The one-step "no prompt" of earlier figures (half the pads' updates under the reference loop) is
no longer drawn: it compared the prompt with half the training.
"""
from __future__ import annotations

from search_spaces import base as _base, pick

#: no prompt, as many updates as a pad (Config rejects a pad prompt of width 0)
MATCHED_NONE = {"prompt": "none", "pad_size": 0, "matched_updates": True}
FROZEN_PAD = 8  # the frozen control's width: zero everywhere, so its width changes nothing


def frozen(pad_size: int = FROZEN_PAD) -> dict:
    """The pad prompt frozen at its zero init: the pads' exact loop, nothing learned."""
    return {"pad_size": pad_size, "learn_prompt": False}


def _pads(*sizes: int) -> dict:
    return {**{size: {"pad_size": size} for size in sizes}, "frozen": frozen(max(sizes)),
            "none": MATCHED_NONE}


def base(preset: str) -> dict:
    # default: the preset's authors' layout (a 64 px image, the prompt over its border) and loop.
    return _base.base(preset)


def space(preset: str) -> dict:
    # paper: the reference code's allowed pads {8, ..., 112} at input = output = 224, where the
    # prompt overlays the image's border. default: pads 4 (23% of the input, near the paper's
    # 26% for 16 of 224 px) and 8 (44%) with both controls, three seeds, in under 25 minutes on
    # 2 CPUs.
    return {"pad": pick(preset, paper=_pads(*range(8, 113, 8)), default=_pads(4, 8),
                        tiny=_pads(4))}
