"""GraSP: gradient signal preservation ``−w ⊙ Hg`` at the pretrained weights, then fine-tuning."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PruneThenTrain, register
from .snip import Forward, data_scoring_setup

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext


def grasp_scores(forward: Forward, weights: list[Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                 temperature: float = 1.0) -> list[Tensor]:
    """GraSP score ``S(−w) = −w ⊙ H g`` (Wang et al. 2020), one tensor per weight.

    ``L`` is the cross-entropy of ``forward(x) / temperature`` summed over the batches;
    ``g = ∇_w L`` (first pass, held constant) and ``H g = ∇_w (gᵀ ∇_w L)`` (second pass, a
    Hessian-gradient product by double backward). GraSP removes the weights with the *largest*
    score, so the importance to keep is ``−S = w ⊙ H g`` (see :class:`GraSP`).
    """
    batches = list(batches)
    g = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = F.cross_entropy(forward(x) / temperature, y)
        for acc, d in zip(g, torch.autograd.grad(loss, weights)):
            acc += d
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = F.cross_entropy(forward(x) / temperature, y)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        z = sum((gi * di).sum() for gi, di in zip(g, grads))
        for acc, d in zip(hg, torch.autograd.grad(z, weights)):
            acc += d
    return [-(w.detach() * h) for w, h in zip(weights, hg)]


@register
class GraSP(PruneThenTrain):
    """GraSP (Wang et al. 2020) at the pretrained weights on ``cfg.prune_batches`` batches with
    temperature ``cfg.grasp_temperature`` (their code: 200), removing the largest scores, i.e.
    keeping the top-k of ``w ⊙ Hg`` under ``cfg.allocation``; fine-tuned with SGD + cosine.
    Costs two forward and three backward passes per scoring batch (counted)."""

    name = "grasp"
    label = "GraSP"
    plot_order = 17

    def importance(self, ctx: "TrialContext") -> list[Tensor]:
        forward, weights, batches = data_scoring_setup(ctx)
        scores = grasp_scores(forward, weights, batches, ctx.cfg.grasp_temperature)
        ctx.count_passes(forward=2 * len(batches), backward=3 * len(batches))
        return [-s for s in scores]
