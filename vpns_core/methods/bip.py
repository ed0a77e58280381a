"""BiP: bi-level pruning (Zhang et al. 2022, "Advancing Model Pruning via Bi-level Optimization").

The problem: ``min_m ℓ(m ⊙ θ*(m))`` s.t. ``θ*(m) = argmin_θ ℓ(m ⊙ θ) + γ/2 ‖θ‖²``,
``m`` binary with ``‖m‖₀ ≤ k``. The mask is relaxed to real scores with the straight-through
top-k of :mod:`vpns_core.masking` (``m = 1[top-k(|s|)]``, ``∂ℓ/∂s := ∂ℓ/∂m``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, register
from .score import mask_stage_groups

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..masking import MaskedNetwork
    from .base import TrialContext


def _unscaled_grad(loss: Tensor, params: Sequence[Tensor], scaler=None) -> list[Tensor | None]:
    """Gradients of ``loss``, taken on the loss scaled by ``scaler`` (the trial's GradScaler,
    enabled under fp16: small gradients of fp16 activations do not flush to zero) and divided
    back in fp32. Without an enabled scaler, plain gradients."""
    if scaler is None or not scaler.is_enabled():
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    scaled = scaler.scale(loss)  # also creates the scale on first use
    scale = float(scaler.get_scale())
    grads = torch.autograd.grad(scaled, params, allow_unused=True)
    return [None if g is None else (g.float() / scale).to(g.dtype) for g in grads]


def _finite(grads: Sequence[Tensor | None]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads if g is not None)


def upper_level_gradient(loss: Tensor, net: "MaskedNetwork", implicit_lr: float,
                         others: Sequence[Tensor] = (), scaler=None
                         ) -> tuple[list[Tensor], list[Tensor | None]]:
    """BiP's implicit gradient of the upper level w.r.t. the mask, one tensor per layer:

    ``dℓ(m ⊙ θ*(m))/dm = ∇_m ℓ − (1/γ) ∇_z ℓ ⊙ ∇_θ ℓ`` with ``z = m ⊙ θ``: the implicit-function
    theorem with their Hessian-free ``[∇²_θθ g]⁻¹ ≈ I/γ`` and bi-linear ``∇²_mθ ℓ = diag(∇_z ℓ)``.
    The upper-level step of their Algorithm A1 (line 5) multiplies by the *weight* gradient; their
    code (trainer/bilevel.py) by the mask gradient (OPTML-Group/BiP issue #3); we follow the
    paper. ``implicit_lr`` is their ``lr2 = 1/γ``. With a binary mask ``∇_θ ℓ = m ⊙ ∇_z ℓ``, so
    ``∇_z ℓ ⊙ ∇_θ ℓ = (∇_θ ℓ)²``. Returned w.r.t. the scores ``s``: the straight-through top-k
    acts on ``|s|`` (``∂ℓ/∂s = sign(s) ⊙ ∂ℓ/∂m``, see :mod:`vpns_core.masking`), so the implicit
    term gets the same ``sign(s)``. Needs score mode with ``weight_orig`` requiring grad. Also
    returns the plain gradients of ``others`` (e.g. the prompt) from the same backward pass.
    """
    scores = [m.weight_scores for _, m in net.layers]
    weights = [m.weight_orig for _, m in net.layers]
    grads = _unscaled_grad(loss, scores + weights + list(others), scaler)
    n = len(scores)
    g_s, g_theta = grads[:n], grads[n:2 * n]
    upper = [gs - implicit_lr * s.detach().sign() * gt * gt for gs, s, gt in zip(g_s, scores, g_theta)]
    return upper, list(grads[2 * n:])


class BilevelStep:
    """One BiP iteration, used as the ``step`` of :meth:`vpns_core.loop.Loop.run_stage`: the stage optimiser
    holds the scores (and the prompt where used) and applies the upper-level update after it."""

    def __init__(self, ctx: "TrialContext") -> None:
        self.ctx = ctx
        scores = {id(s) for s in ctx.net.scores()}
        self.weights = [p for p in ctx.model.parameters() if id(p) not in scores]  # θ: all weights

    def __call__(self, x: Tensor, y: Tensor, prompted: bool, opt: torch.optim.Optimizer) -> tuple[Tensor, Tensor]:
        ctx, cfg = self.ctx, self.ctx.cfg
        for p in self.weights:
            p.requires_grad_(True)
        # Algorithm A1, lower level: one SGD step with the mask m_t fixed,
        # θ_{t+1} = θ_t − β_t ∇_θ [ℓ(m_t ⊙ θ_t) + γ_wd/2 ‖θ_t‖²]; β_t follows the stage's cosine.
        # Under fp16 both levels take their gradients on the loss scaled by the trial's
        # GradScaler; an overflow skips the iteration and backs the scale off, as the scaler
        # does for the other methods.
        scaler = ctx.scaler
        with ctx.autocast():
            logits = ctx.forward(x, prompted).float()
            loss = F.cross_entropy(logits, y)
        grads = _unscaled_grad(loss, self.weights, scaler)
        ctx.count_passes(forward=1, backward=1)
        if scaler.is_enabled() and not _finite(grads):
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            return loss.detach(), logits.detach()
        group = opt.param_groups[0]
        beta = (cfg.bip_weight_lr or cfg.tune_lr) * group["lr"] / group["initial_lr"]
        with torch.no_grad():
            for p, g in zip(self.weights, grads):
                if g is not None:
                    p.add_(g + cfg.weight_decay * p, alpha=-beta)
        # Algorithm A1, upper level (line 5): the implicit gradient at (m_t, θ_{t+1}), applied to
        # the scores by the stage optimiser (cfg.bip_optimizer) right after this call; the
        # projection onto k-sparse binary masks is the top-k of the next forward pass.
        with ctx.autocast():
            logits = ctx.forward(x, prompted).float()
            loss = F.cross_entropy(logits, y)
        scores = ctx.net.scores()
        others = [p for g in opt.param_groups for p in g["params"] if all(p is not s for s in scores)]
        upper, other_grads = upper_level_gradient(loss, ctx.net, cfg.bip_implicit_lr, others, scaler)
        ctx.count_passes(forward=1, backward=1)
        ctx.count_steps(1)  # the lower-level step; the stage counts the upper one
        if scaler.is_enabled() and not _finite(upper + other_grads):
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            return loss, logits  # no .grad set: the optimiser step changes nothing
        for p, g in zip(scores + others, upper + other_grads):
            p.grad = g
        return loss, logits


@register
class BiP(Method):
    """BiP: stage ``mask`` alternates BiP's lower-level SGD step on the weights
    (``cfg.bip_weight_lr``, default ``tune_lr``; weight decay = the lower level's ``γ/2‖θ‖²``) and
    its upper-level step on the scores with the implicit gradient (``cfg.bip_implicit_lr`` = lr2,
    1e-4), each iteration on the same batch, for ``cfg.mask_epochs``; the scores use
    ``cfg.bip_optimizer`` with ``cfg.mask_lr`` (default Adam as for HYDRA/VPNs in the VPNs paper;
    BiP's own code: SGD, lr 0.1). Both follow one cosine decay. The lower level is Algorithm A1's
    plain SGD step (their code adds momentum 0.9). Then the mask is frozen and the weights (BiP's
    trained ones) are fine-tuned with SGD + cosine (stage ``tune``, as their finetune configs).
    Two forward and two backward passes, two gradient steps per iteration (counted).
    """

    name = "bip"
    label = "BiP"
    plot_order = 12

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        return [("mask", cfg.stage_epochs("mask")), ("tune", cfg.stage_epochs("tune"))]

    def run(self, ctx: "TrialContext") -> None:
        cfg = ctx.cfg
        if ctx.stage_pending("mask"):
            ctx.run_stage("mask", mask_stage_groups(ctx, head=False), optimizer=cfg.bip_optimizer, epochs=cfg.stage_epochs("mask"),
                            prompted=cfg.prompt_in_mask_stage, step=BilevelStep(ctx))
        ctx.net.fix()
        ctx.run_tune_stage()
