"""Learned scores with a straight-through top-k: VPNs and HYDRA (VPNs with the prompt off)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, register

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from .base import TrialContext


class ScoreMethod(Method):
    """Learned scores with a straight-through top-k (HYDRA), optionally with a visual prompt (VPNs).

    Stage 1 optimises ``min_{m, δ} L(θ_pre ⊙ 1[top-k(|m|)], x + δ)`` with Adam and cosine decay;
    stage 2 freezes the binarised mask and optimises ``min_{θ, δ} L(θ ⊙ mask, x + δ)`` with SGD
    (VPNs, Sec. 3.2, Eqs. 3-4).
    """

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        return [("mask", cfg.stage_epochs("mask")), ("tune", cfg.stage_epochs("tune"))]

    def run(self, ctx: "TrialContext") -> None:
        cfg = ctx.cfg
        if ctx.stage_pending("mask"):
            ctx.run_stage("mask", mask_stage_groups(ctx), optimizer="adam", epochs=cfg.stage_epochs("mask"),
                            prompted=cfg.prompt_in_mask_stage)
        ctx.net.fix()
        ctx.run_tune_stage()



def mask_stage_groups(ctx: "TrialContext", head: bool = True) -> list[dict]:
    """Mask finding's parameter groups at ``cfg.mask_lr``: the scores (attached on first use),
    a learned head's parameters (``head``), and the prompt where VP is on in this stage."""
    cfg = ctx.cfg
    scores = ctx.net.attach_scores() if ctx.net.mode == "dense" else ctx.net.scores()
    groups = [{"params": scores, "lr": cfg.mask_lr}]
    if head:
        groups += ctx.head_groups(cfg.mask_lr)
    if cfg.prompt_in_mask_stage:
        groups += ctx.prompt_groups(cfg.mask_prompt_lr or cfg.mask_lr)
    return groups

@register
class VPNs(ScoreMethod):
    """VPNs: the prompt co-trained with the scores (stage 1) and with the weights (stage 2)."""

    name = "vpns"
    label = "VPNs"
    plot_order = 10
    uses_prompt = True


@register
class Hydra(ScoreMethod):
    """HYDRA (Sehwag et al. 2020) = VPNs with the visual prompt off in both stages.

    With ``post_prompt`` a prompt is added after HYDRA's mask finding (the pilot study)."""

    name = "hydra"
    label = "HYDRA"
    plot_order = 11
