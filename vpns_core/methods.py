"""Pruning methods: each answers *which weights* and *when*; :mod:`vpns_core.train` owns the loop.

A method's ``run(trial)`` calls the trial's stages. Score-learning methods (VPNs, HYDRA) run
stage 1 (``mask``: scores + prompt, Adam) and then stage 2 (``tune``: weights + prompt, SGD).
``dense`` fine-tunes the unpruned model (the reference line of the sparsity curves).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .train import Trial

METHODS: Registry["Method"] = Registry("method")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    METHODS.add(cls.name, cls())
    return cls


class Method:
    """Base: a pruning method plugged into the single training loop."""

    name = "base"
    #: whether the method removes weights (False for ``dense``)
    prunes = True

    def vp_stages(self, cfg: "Config") -> str:
        """Stages in which the visual prompt is used (``both``, ``mask``, ``tune``, ``none``)."""
        return cfg.vp_stages

    def validate(self, cfg: "Config") -> None:
        """Method-specific config checks; raise ``ConfigError`` naming the field."""

    def run(self, trial: "Trial") -> None:
        raise NotImplementedError


class ScoreMethod(Method):
    """Learned scores with a straight-through top-k (HYDRA), optionally with a visual prompt (VPNs).

    Stage 1 optimises ``min_{m, δ} L(θ_pre ⊙ 1[top-k(|m|)], x + δ)`` with Adam and cosine decay;
    stage 2 freezes the binarised mask and optimises ``min_{θ, δ} L(θ ⊙ mask, x + δ)`` with SGD
    (VPNs, Sec. 3.2, Eqs. 3-4).
    """

    def run(self, trial: "Trial") -> None:
        cfg = trial.cfg
        if trial.mask_file_masks is not None:  # transfer: masks found on another task
            trial.net.fix(trial.mask_file_masks)
        else:
            if trial.stage_pending("mask"):
                scores = trial.net.attach_scores() if trial.net.mode == "dense" else trial.net.scores()
                groups = [{"params": scores, "lr": cfg.mask_lr}]
                groups += trial.head_groups(cfg.mask_lr)
                if cfg.prompt_in_mask_stage:
                    groups.append({"params": trial.prompt_params(), "lr": cfg.mask_prompt_lr or cfg.mask_lr})
                trial.run_stage("mask", groups, optimizer="adam", epochs=cfg.mask_epochs,
                                prompted=cfg.prompt_in_mask_stage)
            trial.net.fix()
        trial.run_tune_stage()


@register
class VPNs(ScoreMethod):
    name = "vpns"


@register
class Hydra(ScoreMethod):
    """HYDRA = VPNs with the visual prompt off in both stages."""

    name = "hydra"

    def vp_stages(self, cfg: "Config") -> str:
        return "none"


@register
class Dense(Method):
    """Dense fine-tuning of the whole pretrained model (with the prompt if VP is on in tuning)."""

    name = "dense"
    prunes = False

    def run(self, trial: "Trial") -> None:
        trial.run_tune_stage()
