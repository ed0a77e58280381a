"""SNIP: connection sensitivity ``|w ⊙ ∂L/∂w|`` at the pretrained weights, then fine-tuning."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PruneThenTrain, register

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext

Forward = Callable[[Tensor], Tensor]


def snip_scores(forward: Forward, weights: list[Tensor], batches: Iterable[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """SNIP connection sensitivity (Lee et al. 2019, unnormalised): ``|w ⊙ Σ_b ∂L_b/∂w|``.

    ``L_b`` is the mean cross-entropy of ``forward(x_b)`` on batch ``b``; ``∂L/∂c`` at the all-ones
    mask ``c`` equals ``w ⊙ ∂L/∂w``. The normalisation by the sum does not change the ranking.
    Returns one tensor per weight, its shape.
    """
    grads = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = F.cross_entropy(forward(x), y)
        for g, d in zip(grads, torch.autograd.grad(loss, weights)):
            g += d
    return [(w.detach() * g).abs() for w, g in zip(weights, grads)]


def data_scoring_setup(ctx: "TrialContext") -> tuple[Forward, list[Tensor], list[tuple[Tensor, Tensor]]]:
    """What data-driven scores need: the unprompted forward in eval mode (BatchNorm statistics are
    left untouched) with a provisional label mapping of the dense model (recomputed after
    pruning, as for every method), the prunable weights, and ``cfg.prune_batches`` training
    batches (test-time transform) drawn with ``cfg.seed``."""
    ctx.compute_label_mapping(prompted=False)
    ctx.model.eval()
    weights = [m.weight for _, m in ctx.net.layers]
    for w in weights:
        w.requires_grad_(True)
    return (lambda x: ctx.forward(x, prompted=False)), weights, ctx.scoring_batches(ctx.cfg.prune_batches)


@register
class SNIP(PruneThenTrain):
    """SNIP (Lee et al. 2019) at the pretrained weights on ``cfg.prune_batches`` batches, keep the
    top-k under ``cfg.allocation``, fine-tune with SGD + cosine. Costs one forward and one
    backward pass per scoring batch (counted)."""

    name = "snip"
    label = "SNIP"
    plot_order = 16

    def importance(self, ctx: "TrialContext") -> list[Tensor]:
        forward, weights, batches = data_scoring_setup(ctx)
        scores = snip_scores(forward, weights, batches)
        ctx.count_passes(forward=len(batches), backward=len(batches))
        return scores
