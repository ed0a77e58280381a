"""SynFlow: data-free iterative synaptic-flow pruning at the pretrained weights, then fine-tuning."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .base import PruneThenTrain, register

if TYPE_CHECKING:  # pragma: no cover
    from .base import TrialContext


class Linearised:
    """A float64 copy of ``model`` in eval mode with every parameter and floating buffer replaced
    by its absolute value, for the synaptic-flow objective (Tanaka et al. 2020, Alg. 1)."""

    def __init__(self, model: nn.Module, layer_names: list[str], input_shape: tuple[int, ...]) -> None:
        self.model = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if t.is_floating_point():
                    t.abs_()
        modules = dict(self.model.named_modules())
        self.weights = [modules[n].weight for n in layer_names]
        self.pristine = [w.detach().clone() for w in self.weights]
        device = self.weights[0].device
        self.input = torch.ones((1, *input_shape), dtype=torch.float64, device=device)

    def scores(self, masks: list[Tensor] | None = None) -> list[Tensor]:
        """``|θ ⊙ ∂R/∂θ|`` with ``R = 1ᵀ f(1; |θ ⊙ mask|)`` (Tanaka et al. 2020, the synaptic saliency)."""
        with torch.no_grad():
            for i, (w, w0) in enumerate(zip(self.weights, self.pristine)):
                w.copy_(w0 if masks is None else w0 * masks[i].to(w0.dtype))
        for w in self.weights:
            w.requires_grad_(True)
        r = self.model(self.input).sum()
        grads = torch.autograd.grad(r, self.weights)
        return [(w.detach() * g).abs() for w, g in zip(self.weights, grads)]


def synflow_scores(model: nn.Module, layer_names: list[str], input_shape: tuple[int, ...],
                   masks: list[Tensor] | None = None) -> list[Tensor]:
    """One round of SynFlow scores for the layers ``layer_names`` of ``model``; no data needed."""
    return Linearised(model, layer_names, input_shape).scores(masks)


@register
class SynFlow(PruneThenTrain):
    """SynFlow (Tanaka et al. 2020): ``cfg.synflow_iterations`` rounds (default 100) on an all-ones
    input through the absolute-valued float64 network; round ``k`` of ``n`` keeps density
    ``(1 − s)^(k/n)`` (the exponential schedule), pruned weights never return, round ``n`` hits
    the target exactly; top-k under ``cfg.allocation`` (their paper: global). Uses no data at
    all; one forward and one backward pass (batch 1) per round (counted). Fine-tuned with SGD +
    cosine."""

    name = "synflow"
    label = "SynFlow"
    plot_order = 18

    def prune(self, ctx: "TrialContext") -> None:
        cfg, net = ctx.cfg, ctx.net
        flow = Linearised(ctx.model, [n for n, _ in net.layers], (3, cfg.output_size, cfg.output_size))
        masks: list[Tensor] | None = None
        n = cfg.synflow_iterations
        for k in range(1, n + 1):
            scores = flow.scores(masks)
            if masks is not None:  # pruned weights stay pruned
                scores = [s.masked_fill(~m.to(s.device), float("-inf")) for s, m in zip(scores, masks)]
            sparsity = cfg.sparsity if k == n else 1.0 - (1.0 - cfg.sparsity) ** (k / n)
            chosen = net.top_k_masks(scores, sparsity=sparsity)
            masks = [chosen[name] for name, _ in net.layers]
        ctx.count_passes(forward=n, backward=n)
        net.fix(dict(zip([name for name, _ in net.layers], masks)))
