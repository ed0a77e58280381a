"""OMP: one-shot magnitude pruning of the pretrained weights, then fine-tuning."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import PruneThenTrain, register, with_prompt

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext


@register
class OneShotMagnitude(PruneThenTrain):
    """OMP: keep the largest ``|θ_pre|`` (Han et al. 2015, one shot), fine-tune with SGD + cosine.

    ``allocation="global"`` is the paper's global magnitude pruning (one threshold over all
    prunable layers); ``"layerwise"`` / ``"erk"`` rank magnitudes inside each layer's budget.
    """

    name = "omp"
    label = "OMP"
    plot_order = 14

    def importance(self, ctx: "TrialContext") -> list[torch.Tensor]:
        return [m.weight.detach().abs() for _, m in ctx.net.layers]


register(with_prompt(OneShotMagnitude))
