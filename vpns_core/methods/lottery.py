"""LTH / IMP: iterative magnitude pruning with rewinding to the pretrained weights."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .base import Method, register, with_prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from .base import TrialContext


def lth_rounds(sparsity: float, rate: float = 0.2) -> int:
    """Pruning rounds ``K`` to reach ``sparsity`` removing ``rate`` of the remaining weights per
    round: the least ``k`` with ``1 − (1 − rate)^k ≥ sparsity`` (0 for sparsity 0)."""
    if sparsity <= 0:
        return 0
    return math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - rate) - 1e-9)


def round_sparsity(k: int, sparsity: float, rate: float = 0.2) -> float:
    """Sparsity after ``k`` pruning rounds: ``1 − (1 − rate)^k``, exactly ``sparsity`` at the last."""
    return sparsity if k >= lth_rounds(sparsity, rate) else 1.0 - (1.0 - rate) ** k


@register
class LotteryTicket(Method):
    """IMP with rewinding to the pretrained weights (Frankle & Carbin 2019; Chen et al. 2021 for
    pretrained models).

    Stage ``round{k}`` (k = 0 … K−1) fine-tunes the model at sparsity ``1 − 0.8^k`` (round 0 is
    dense) for ``cfg.lth_epochs_per_round`` epochs (SGD + cosine, like the tune stage); then the
    ``cfg.lth_rate`` (20%) smallest-magnitude surviving weights are pruned (top-k of the trained
    ``|θ|`` under ``cfg.allocation``; global = the paper's IMP) and every parameter and BatchNorm
    statistic is rewound to its pretrained value. ``K = ceil(log(1 − s) / log(0.8))`` and round K
    prunes exactly to ``s``; the final ``tune`` stage fine-tunes that ticket and is reported as
    round K. Every epoch row carries ``round``, usable as a sweep's time attribute. The prompt
    (``vpns_lth`` only) is trained in every round if ``cfg.vp_stages`` has ``mask`` and in the
    final stage if it has ``tune``; it is not rewound.
    """

    name = "lth"
    semi_structured = False  # 20% of the remaining weights per round: no N:M schedule
    label = "LTH"
    plot_order = 15
    rewinds = True

    def rounds(self, cfg: "Config") -> int:
        return lth_rounds(cfg.sparsity, cfg.lth_rate)

    def epochs_per_round(self, cfg: "Config") -> int:
        return cfg.tune_epochs if cfg.lth_epochs_per_round is None else cfg.lth_epochs_per_round

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        e = self.epochs_per_round(cfg)
        return [(f"round{k}", e) for k in range(self.rounds(cfg))] + [("tune", cfg.stage_epochs("tune"))]

    def run(self, ctx: "TrialContext") -> None:
        cfg = ctx.cfg
        rounds = self.rounds(cfg)
        for k in range(rounds):
            ctx.run_tune_stage(f"round{k}", epochs=self.epochs_per_round(cfg),
                                 prompted=cfg.prompt_in_mask_stage, extra_metrics={"round": k})
            ctx.run_once(f"prune{k + 1}", lambda k=k: self.prune_and_rewind(ctx, k + 1))
        ctx.run_tune_stage(extra_metrics={"round": rounds})

    def prune_and_rewind(self, ctx: "TrialContext", k: int) -> None:
        """Round ``k``: keep the largest trained magnitudes among the survivors at sparsity
        ``round_sparsity(k)``, then rewind all weights to the pretrained values (masked)."""
        net = ctx.net
        with torch.no_grad():
            importance = [m.weight.detach().abs() for _, m in net.layers]
            if net.mode == "fixed":  # pruned weights never come back
                importance = [v.masked_fill(~m.weight_mask, float("-inf"))
                              for v, (_, m) in zip(importance, net.layers)]
        masks = net.top_k_masks(importance, sparsity=round_sparsity(k, ctx.cfg.sparsity, ctx.cfg.lth_rate))
        ctx.rewind()
        net.fix(masks)


register(with_prompt(LotteryTicket))
