"""Channel-level methods: structured VPNs, Network Slimming and DepGraph (torch-pruning).

``cfg.sparsity`` is the *channel* sparsity: the fraction of output channels removed from every
dependency group (``cfg.channel_allocation='layerwise'``) or over all groups (``'global'``); the
classifier head keeps its outputs. After pruning, the channels are physically removed
(:class:`vpns_core.structured.ChannelPruner`), so fine-tuning already runs on the smaller model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, register

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..train import Trial

MAX_CHANNEL_SPARSITY = 0.9


class ChannelMethod(Method):
    """Optional warm-up (``cfg.warmup_epochs``: SGD + cosine on the dense weights, with the
    method's sparse-training penalty and, for VPNs, the prompt), the method's channel selection,
    physical removal, then fine-tuning (``tune``, SGD + cosine, prompt per ``cfg.vp_stages``)."""

    structured = True
    #: the ChannelPruner importance: vpns (learned scores) | slim | depgraph
    importance = "vpns"

    def vp_stages(self, cfg: "Config") -> str:
        if self.uses_prompt:
            return cfg.vp_stages
        return "none" if cfg.post_prompt == "none" else "tune"

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        warmup = [("warmup", cfg.warmup_epochs)] if cfg.warmup_epochs else []
        return warmup + [("tune", cfg.tune_epochs)]

    def validate(self, cfg: "Config") -> None:
        super().validate(cfg)
        from ..config import ConfigError
        if cfg.sparsity > MAX_CHANNEL_SPARSITY:
            raise ConfigError(f"sparsity: channel methods remove at most {MAX_CHANNEL_SPARSITY:g} of "
                              f"the channels (got {cfg.sparsity!r})")
        if cfg.mask_file is not None:
            raise ConfigError(f"mask_file: weight masks cannot be transferred to channel method "
                              f"'{self.name}' (got {cfg.mask_file!r})")

    def warmup(self, trial: "Trial", prompted: bool) -> None:
        cfg = trial.cfg
        if cfg.warmup_epochs and trial.stage_pending("warmup"):
            trial.run_tune_stage("warmup", epochs=cfg.warmup_epochs, prompted=prompted,
                                 after_backward=trial.channels.regularize)

    def select(self, trial: "Trial") -> None:
        """Set the channel plan (torch-pruning's choice under this method's importance) and
        remove those channels."""
        trial.remove_channels(trial.channels.plan())

    def run(self, trial: "Trial") -> None:
        self.warmup(trial, prompted=False)
        trial.run_once("prune", lambda: self.select(trial))
        trial.run_tune_stage()


@register
class Slim(ChannelMethod):
    """Network Slimming (Liu et al. 2017): L1 on BatchNorm γ during the warm-up (sparse training,
    ``cfg.channel_reg``, torch-pruning's default 1e-5), channels ranked by |γ| (summed over each
    dependency group), removed, fine-tuned."""

    name = "slim"
    importance = "slim"


@register
class DepGraph(ChannelMethod):
    """DepGraph (Fang et al. 2023): group-sparse warm-up (``GroupNormPruner``'s penalty,
    ``cfg.channel_reg``, default 1e-4), channels ranked by the L2 norm of all the parameters
    coupled to them in the group, removed, fine-tuned."""

    name = "depgraph"
    importance = "depgraph"


@register
class VPNsStructured(ChannelMethod):
    """Structured VPNs: one learned score per channel of each dependency group, optimised with the
    visual prompt (Adam, ``cfg.mask_lr``, cosine) through a straight-through top-k channel gate at
    the frozen (pretrained, or warmed-up) weights, for ``cfg.mask_epochs``; the lowest-|score|
    channels of each group are removed, and the smaller model is fine-tuned with the prompt
    (``tune``). Warm-up epochs (``cfg.warmup_epochs``, the paper's appendix) train the dense weights
    with the prompt before the scores. Scores start at the DepGraph group magnitude."""

    name = "vpns_structured"
    uses_prompt = True
    importance = "vpns"

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        warmup = [("warmup", cfg.warmup_epochs)] if cfg.warmup_epochs else []
        return warmup + [("mask", cfg.mask_epochs), ("tune", cfg.tune_epochs)]

    def run(self, trial: "Trial") -> None:
        cfg = trial.cfg
        self.warmup(trial, prompted=cfg.prompt_in_mask_stage)
        if trial.stage_pending("mask"):
            ch = trial.channels
            scores = ch.attach_scores() if not len(ch.scores) else list(ch.scores.values())
            groups = [{"params": scores, "lr": cfg.mask_lr}] + trial.head_groups(cfg.mask_lr)
            if cfg.prompt_in_mask_stage:
                groups.append({"params": trial.prompt_params(), "lr": cfg.mask_prompt_lr or cfg.mask_lr})
            trial.run_stage("mask", groups, optimizer="adam", epochs=cfg.mask_epochs,
                            prompted=cfg.prompt_in_mask_stage)
        trial.run_once("prune", lambda: self.select(trial))
        trial.run_tune_stage()
