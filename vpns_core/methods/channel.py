"""Channel methods: structured VPNs, Network Slimming and DepGraph (torch-pruning).

``cfg.sparsity`` is the *channel* sparsity: the fraction of output channels removed from every
dependency group (``cfg.channel_allocation='layerwise'``) or over all groups (``'global'``); the
classifier head keeps its outputs. Each method gives the torch-pruning importance (and pruner)
that ranks a group's channels; the mechanism (groups, gates, removal, measurement) is
:mod:`vpns_core.channel_pruning`. After the selection the channels are physically removed, so
fine-tuning already runs on the smaller model, and the trial's final row compares it with the
dense model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..channel_pruning import ChannelPruner, count_parameters, tp
from ..costs import compare
from ..errors import ConfigError
from ..models import build_model, replace_head
from .base import Method, register

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from .base import TrialContext

MAX_CHANNEL_SPARSITY = 0.9
#: images whose logits must not change when the gated channels are removed
REMOVAL_CHECK_IMAGES = 32


class ChannelMethod(Method):
    """Optional warm-up (``cfg.warmup_epochs``: SGD + cosine on the dense weights, with the
    method's sparse-training penalty and, for VPNs, the prompt), the method's channel selection,
    physical removal, then fine-tuning (``tune``, SGD + cosine, prompt per ``cfg.vp_stages``).

    Subclasses give ``importance(channels)`` (a torch-pruning importance of a group) and, where
    the method trains with a penalty, ``pruner`` (the torch-pruning pruner that owns it)."""

    structured = True
    #: whether the warm-up adds the pruner's sparse-training penalty (``pruner.regularize``)
    sparse_training = False

    def __init__(self) -> None:
        #: this trial's dependency groups, gates and physical removal (built by ``setup``)
        self.channels: ChannelPruner | None = None

    # --- which channels: torch-pruning importance and pruner ------------------------------

    def importance(self, channels: ChannelPruner) -> Any:
        """The ``torch_pruning.importance.Importance`` that ranks each group's channels."""
        raise NotImplementedError

    def pruner(self, channels: ChannelPruner, model: torch.nn.Module, reg: float | None,
               **common: Any) -> Any:
        """The torch-pruning pruner of ``model`` under this method's importance; ``common`` are
        the :class:`ChannelPruner`'s arguments (example inputs, ratio, allocation, ignored
        layers), ``reg`` the sparse-training penalty (None: torch-pruning's default)."""
        return tp.pruner.BasePruner(model, importance=self.importance(channels), **common)

    # --- when: the stages ---------------------------------------------------------------------

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        warmup = [("warmup", cfg.warmup_epochs)] if cfg.warmup_epochs else []
        return warmup + [("tune", cfg.stage_epochs("tune"))]

    def validate(self, cfg: "Config") -> None:
        super().validate(cfg)
        if cfg.sparsity > MAX_CHANNEL_SPARSITY:
            raise ConfigError(f"sparsity: channel methods remove at most {MAX_CHANNEL_SPARSITY:g} of "
                              f"the channels (got {cfg.sparsity!r})")
        if cfg.mask_file is not None:
            raise ConfigError(f"mask_file: weight masks cannot be transferred to channel method "
                              f"'{self.name}' (got {cfg.mask_file!r})")

    def warmup(self, ctx: "TrialContext", prompted: bool) -> None:
        cfg = ctx.cfg
        if cfg.warmup_epochs and ctx.stage_pending("warmup"):
            ctx.run_tune_stage("warmup", epochs=cfg.warmup_epochs, prompted=prompted,
                                 after_backward=self.channels.regularize)

    def select(self, ctx: "TrialContext") -> None:
        """Set the channel plan (torch-pruning's choice under this method's importance) and
        remove those channels."""
        self.remove(ctx, self.channels.plan())

    def remove(self, ctx: "TrialContext", plan: dict[str, list[int]]) -> None:
        """Remove the channels of ``plan``, checking on prompted training images that the smaller
        model computes the logits of the gated one (``removal_max_abs_diff``)."""
        x = ctx.prompt(ctx.first_images(REMOVAL_CHECK_IMAGES), enabled=True)
        self.channels.remove_checked(plan, x)

    def run(self, ctx: "TrialContext") -> None:
        self.warmup(ctx, prompted=False)
        ctx.run_once("prune", lambda: self.select(ctx))
        ctx.run_tune_stage()

    # --- hooks of the trial ----------------------------------------------------------

    def weight_sparsity(self, cfg: "Config") -> float:
        return 0.0  # no weight masks: whole channels go

    def setup(self, ctx: "TrialContext") -> None:
        """torch-pruning's dependency groups of the trial's model (``self.channels``); the
        classifier head keeps its outputs."""
        cfg = ctx.cfg
        self.channels = ChannelPruner(
            ctx.model, torch.zeros(1, 3, cfg.output_size, cfg.output_size, device=ctx.device),
            cfg.sparsity, method=self, allocation=cfg.channel_allocation,
            ignored=(dict(ctx.model.named_modules())[ctx.head_name],), reg=cfg.channel_reg)

    def sparsity_report(self, ctx: "TrialContext") -> dict[str, float]:
        """``sparsity`` is the channel sparsity; ``sparsity_all_layers`` the parameters gone."""
        ch = self.channels
        report = ch.report()
        return {"sparsity": report["channel_sparsity"],
                "sparsity_all_layers": 1.0 - count_parameters(ctx.model) / ch.dense_params,
                "min_layer_density": report["min_group_density"]}

    def checkpoint_state(self, ctx: "TrialContext") -> dict[str, Any]:
        return {"channels": self.channels.state(),
                "removal_max_abs_diff": self.channels.removal_max_abs_diff}

    def restore(self, ctx: "TrialContext", state: dict[str, Any]) -> None:
        if state.get("channels"):
            self.channels.load_state(state["channels"])  # re-remove channels / re-attach scores
        self.channels.removal_max_abs_diff = state.get("removal_max_abs_diff")

    def final_metrics(self, ctx: "TrialContext") -> dict[str, Any]:
        """Dense vs pruned parameters (``dense_params``, ``pruned_params``, ``params_ratio``) and
        ``removal_max_abs_diff``, always; with ``cfg.cost_record`` also
        :func:`vpns_core.costs.compare` of the two (``dense_*`` / ``pruned_*``: FLOPs with
        ``cfg.count_flops``, peak memory, and with ``cfg.measure_repeats`` timed runs the latency
        and throughput at batch 1 and 64 and the training step), measured one after the other
        here."""
        cfg, ch = ctx.cfg, self.channels
        pruned = count_parameters(ctx.model)
        out: dict[str, Any] = {"dense_params": float(ch.dense_params), "pruned_params": float(pruned),
                               "params_ratio": pruned / ch.dense_params}
        if cfg.cost_record:
            dense = build_model(cfg.model, pretrained=False).module
            if cfg.head == "linear":
                replace_head(dense, ctx.num_classes)
            out.update(compare(dense, ctx.model, cfg.output_size, device=ctx.device,
                               repeats=cfg.measure_repeats, count_flops=cfg.count_flops,
                               amp_dtype=ctx.amp_dtype))
        out["removal_max_abs_diff"] = ch.removal_max_abs_diff
        return out


@register
class Slim(ChannelMethod):
    """Network Slimming (Liu et al. 2017): L1 on BatchNorm γ during the warm-up (sparse training,
    ``cfg.channel_reg``, torch-pruning's default 1e-5), channels ranked by |γ| (summed over each
    dependency group), removed, fine-tuned."""

    name = "slim"
    label = "Network Slimming"
    plot_order = 1
    sparse_training = True

    def importance(self, channels: ChannelPruner) -> Any:
        return tp.importance.BNScaleImportance()

    def pruner(self, channels: ChannelPruner, model: torch.nn.Module, reg: float | None,
               **common: Any) -> Any:
        kw = {} if reg is None else {"reg": reg}
        return tp.pruner.BNScalePruner(model, importance=self.importance(channels), **common, **kw)


@register
class DepGraph(ChannelMethod):
    """DepGraph (Fang et al. 2023): group-sparse warm-up (``GroupNormPruner``'s penalty,
    ``cfg.channel_reg``, default 1e-4), channels ranked by the L2 norm of all the parameters
    coupled to them in the group, removed, fine-tuned."""

    name = "depgraph"
    label = "DepGraph"
    plot_order = 2
    sparse_training = True

    def importance(self, channels: ChannelPruner) -> Any:
        return tp.importance.GroupMagnitudeImportance(p=2)

    def pruner(self, channels: ChannelPruner, model: torch.nn.Module, reg: float | None,
               **common: Any) -> Any:
        kw = {} if reg is None else {"reg": reg}
        return tp.pruner.GroupNormPruner(model, importance=self.importance(channels), **common, **kw)


@register
class VPNsStructured(ChannelMethod):
    """Structured VPNs: one learned score per channel of each dependency group, optimised with the
    visual prompt (Adam, ``cfg.mask_lr``, cosine) through a straight-through top-k channel gate at
    the frozen (pretrained, or warmed-up) weights, for ``cfg.mask_epochs``; the lowest-|score|
    channels of each group are removed, and the smaller model is fine-tuned with the prompt
    (``tune``). Warm-up epochs (``cfg.warmup_epochs``, the paper's appendix) train the dense weights
    with the prompt before the scores. Scores start at the DepGraph group magnitude."""

    name = "vpns_structured"
    label = "VPNs (channels)"
    plot_order = 0
    uses_prompt = True

    def importance(self, channels: ChannelPruner) -> Any:
        """|learned score| of each root channel of a group (None for a group without scores)."""

        class ScoreImportance(tp.importance.Importance):
            @torch.no_grad()
            def __call__(self, group) -> Tensor | None:
                name = channels.names.get(group[0].dep.target.module)
                scores = channels.scores_of(name) if name is not None else None
                return None if scores is None else scores.detach().abs().float()

        return ScoreImportance()

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        warmup = [("warmup", cfg.warmup_epochs)] if cfg.warmup_epochs else []
        return warmup + [("mask", cfg.stage_epochs("mask")), ("tune", cfg.stage_epochs("tune"))]

    def run(self, ctx: "TrialContext") -> None:
        cfg = ctx.cfg
        self.warmup(ctx, prompted=cfg.prompt_in_mask_stage)
        if ctx.stage_pending("mask"):
            ch = self.channels
            scores = ch.attach_scores() if not len(ch.scores) else list(ch.scores.values())
            groups = [{"params": scores, "lr": cfg.mask_lr}] + ctx.head_groups(cfg.mask_lr)
            if cfg.prompt_in_mask_stage:
                groups += ctx.prompt_groups(cfg.mask_prompt_lr or cfg.mask_lr)
            ctx.run_stage("mask", groups, optimizer="adam", epochs=cfg.stage_epochs("mask"),
                            prompted=cfg.prompt_in_mask_stage)
        ctx.run_once("prune", lambda: self.select(ctx))
        ctx.run_tune_stage()
