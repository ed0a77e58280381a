"""Random pruning: a uniformly random mask at the target sparsity, then fine-tuning."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import PruneThenTrain, register, with_prompt

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext


@register
class RandomPruning(PruneThenTrain):
    """Random mask: i.i.d. uniform importance, top-k under ``cfg.allocation``.

    ``allocation="layerwise"`` removes exactly the same fraction of every layer; ``"global"`` picks
    ``global_keep`` weights uniformly among all prunable weights (each layer keeps ≈ 1 − s);
    ``"erk"`` draws uniformly inside each layer's ERK budget. Drawn from a generator seeded with
    ``cfg.seed`` alone, so the mask is reproducible by seed. Fine-tuned with SGD + cosine.
    """

    name = "random"
    label = "Random"
    plot_order = 13

    def importance(self, ctx: "TrialContext") -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.cfg.seed)
        return [torch.rand(m.weight.shape, generator=gen) for _, m in ctx.net.layers]


register(with_prompt(RandomPruning))
