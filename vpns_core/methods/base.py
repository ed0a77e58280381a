"""The :class:`Method` interface, the :class:`TrialContext` a method sees, and the ``METHODS``
registry.

A method answers *which weights* (an importance → mask, or learned scores) and *when* (once,
iteratively, learned); :mod:`vpns_core.loop` owns the one training loop. Methods are registered
as classes (like timm's ``@register_model``) and created once per ctx, so per-ctx state (the
channel methods' dependency groups) lives in the method. ``run(ctx)`` calls the context's stages
(``ctx.run_stage`` / ``ctx.run_tune_stage``) and untrained steps (``ctx.run_once``);
``stages(cfg)`` lists the training stages it will run, with their epochs.

The ctx also calls a few hooks at fixed points (``setup``, ``sparsity_report``,
``checkpoint_state`` / ``restore``, ``export_entries``, ``final_metrics``), each given the
context; their defaults serve the weight methods (masks in
:class:`vpns_core.masking.MaskedNetwork`), and the channel methods
(:mod:`vpns_core.methods.channel`) override them. ``label`` and ``plot_order`` are how figures
name and order the method.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

    from ..config import Config
    from ..masking import MaskedNetwork
    from ..prompts import Prompt

METHODS: Registry[type["Method"]] = Registry("method")
POST_PROMPTS = ("none", "zero_shot", "fine_tune")


class TrialContext(Protocol):
    """What a method may use of its ctx (:class:`vpns_core.train.Context`), and nothing else."""

    cfg: "Config"
    device: "torch.device"
    net: "MaskedNetwork"          # the weight masks over ``model``
    model: "nn.Module"            # the network (its head included)
    prompt: "Prompt"
    head_name: str
    num_classes: int              # target classes
    num_source_classes: int       # classes of the pretrained head
    amp_dtype: "torch.dtype | None"
    scaler: "torch.amp.GradScaler"
    mask_file_masks: "dict[str, Tensor] | None"  # the masks of ``cfg.mask_file`` (transfer)

    def run_stage(self, stage: str, groups: list[dict], *, optimizer: str, epochs: int, prompted: bool,
                  recalibrate: bool = False, step: Callable | None = None, extra_metrics: dict | None = None,
                  after_backward: Callable[[], None] | None = None) -> None: ...
    def run_tune_stage(self, stage: str = "tune", **kwargs: Any) -> None: ...
    def run_once(self, name: str, fn: Callable[[], None]) -> None: ...
    def stage_pending(self, stage: str) -> bool: ...
    def count_passes(self, forward: int = 0, backward: int = 0) -> None: ...
    def count_steps(self, steps: int) -> None: ...
    def forward(self, x: "Tensor", prompted: bool) -> "Tensor": ...
    def autocast(self) -> Any: ...
    def rewind(self) -> None: ...
    def head_groups(self, lr: float) -> list[dict]: ...
    def prompt_groups(self, lr: float) -> list[dict]: ...
    def scoring_batches(self, n: int) -> list[tuple["Tensor", "Tensor"]]: ...
    def first_images(self, n: int) -> "Tensor": ...
    def compute_label_mapping(self, prompted: bool) -> "Tensor": ...


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: register ``cls`` under ``cls.name`` (a trial creates its own instance)."""
    METHODS.add(cls.name, cls)
    return cls


def method_for(name: str) -> "Method":
    """A fresh instance of the method registered as ``name`` (to ask it about a config)."""
    return METHODS.get(name, "method")()


class Method:
    """Base: a pruning method plugged into the single training loop.

    Prompt use: a method with ``uses_prompt`` follows ``cfg.vp_stages`` (VPNs and "VPNs w. X");
    a plain pruner uses no prompt, unless ``cfg.post_prompt`` adds one after pruning (the pilot
    study: ``zero_shot`` learns only the prompt on the frozen sparse model, ``fine_tune`` learns
    it while fine-tuning the weights).
    """

    name = "base"
    #: the method's name in figures and tables
    label = "base"
    #: its place in figure legends and tables (smaller first)
    plot_order = 100
    #: whether the method removes weights (False for ``dense``)
    prunes = True
    #: whether the method's own pipeline trains the visual prompt (per ``cfg.vp_stages``)
    uses_prompt = False
    #: whether the trial must keep a copy of the pretrained state (weight rewinding)
    rewinds = False
    #: whether it removes whole channels (:mod:`vpns_core.methods.channel`; sparsity = channel sparsity)
    structured = False
    #: whether its masks can follow an N:M pattern (``cfg.pattern``): it ranks weights once, or
    #: learns scores whose mask is recomputed each step; not iterative schedules (LTH)
    semi_structured = True

    def vp_stages(self, cfg: "Config") -> str:
        """Stages in which the visual prompt is used (``both``, ``mask``, ``tune``, ``none``)."""
        if self.uses_prompt:
            return cfg.vp_stages
        return "none" if cfg.post_prompt == "none" else "tune"

    def stages(self, cfg: "Config") -> list[tuple[str, int]]:
        """The training stages ``run`` calls, in order, with their epochs."""
        return [("tune", cfg.stage_epochs("tune"))]

    def validate(self, cfg: "Config") -> None:
        """Method-specific config checks; raise ``ConfigError`` naming the field."""
        if cfg.post_prompt != "none":
            if self.uses_prompt or not self.prunes:
                raise ConfigError(f"post_prompt: only for pruners without their own prompt "
                                  f"(not '{self.name}'); got {cfg.post_prompt!r}")
            if cfg.prompt == "none":
                raise ConfigError(f"post_prompt: needs a prompt type, not prompt='none' "
                                  f"(got {cfg.post_prompt!r})")
        if cfg.mask_file is not None and not self.prunes:
            raise ConfigError(f"mask_file: method '{self.name}' does not prune (got {cfg.mask_file!r})")
        if cfg.nm is not None and not (self.prunes and self.semi_structured and not self.structured):
            raise ConfigError(f"pattern: method '{self.name}' cannot produce {cfg.pattern} masks "
                              f"(N:M works with the score methods and the one-shot rankers); "
                              f"got pattern={cfg.pattern!r}")

    def run(self, ctx: "TrialContext") -> None:
        raise NotImplementedError

    def transfer(self, ctx: "TrialContext") -> None:
        """Fine-tune the mask of ``cfg.mask_file`` (found by any method, on any task) instead of
        finding one: the same tune stage as after this method's own pruning, prompt included."""
        if ctx.net.mode != "fixed":
            ctx.net.fix(ctx.mask_file_masks)
        ctx.run_tune_stage()

    # --- hooks of the trial (defaults: weight masks) ---------------------------------

    def weight_sparsity(self, cfg: "Config") -> float:
        """Sparsity of the trial's weight masks (``MaskedNetwork``): ``cfg.sparsity`` for a
        weight pruner, 0 for a method that keeps every weight."""
        return cfg.sparsity if self.prunes else 0.0

    def setup(self, ctx: "TrialContext") -> None:
        """Called once the model and its weight masks are built, before a checkpoint is restored."""

    def sparsity_report(self, ctx: "TrialContext") -> dict[str, float]:
        """``sparsity`` (the method's own), ``sparsity_all_layers`` and ``min_layer_density`` of
        the model now: an epoch row's sparsity columns."""
        if ctx.net.mode != "dense":
            return ctx.net.sparsity_report()
        return {"sparsity": 0.0, "sparsity_all_layers": 0.0, "min_layer_density": 1.0}

    def checkpoint_state(self, ctx: "TrialContext") -> dict[str, Any]:
        """Entries the method adds to the trial's checkpoint (weights_only-safe values)."""
        return {}

    def restore(self, ctx: "TrialContext", state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved, from the whole checkpoint ``state``, on the
        freshly built ctx, before its model's state dict is loaded."""

    def export_entries(self, ctx: "TrialContext") -> dict[str, Any]:
        """Entries the method adds to ``model_export.pt``: by default how to rebuild the plain
        network without vpns (``scripts/load_pruned.py``), its builder and the channel counts of
        every Conv/Linear/BatchNorm (a new linear head's included)."""
        from ..channel_pruning import architecture
        from ..models import builder_spec
        return {"architecture": architecture(ctx.model),
                "builder": builder_spec(ctx.cfg.model, ctx.num_source_classes)}

    def final_metrics(self, ctx: "TrialContext") -> dict[str, Any]:
        """Metrics the method adds to the trial's final row."""
        return {}


class PruneThenTrain(Method):
    """Score once at the pretrained weights, keep the top-k (``cfg.allocation``), fine-tune.

    Subclasses give ``importance(ctx)``: one tensor per prunable layer, the weight's shape,
    larger = keep. The fine-tuning stage is SGD + cosine on weights (and prompt where used).
    """

    def vp_stages(self, cfg: "Config") -> str:
        stages = super().vp_stages(cfg)
        return {"both": "tune", "mask": "none"}.get(stages, stages)  # no mask-finding training

    def importance(self, ctx: "TrialContext") -> list:
        raise NotImplementedError

    def prune(self, ctx: "TrialContext") -> None:
        ctx.net.fix(ctx.net.top_k_masks(self.importance(ctx)))

    def run(self, ctx: "TrialContext") -> None:
        ctx.run_once("prune", lambda: self.prune(ctx))
        ctx.run_tune_stage()


def with_prompt(cls: type[Method]) -> type[Method]:
    """"VPNs w. X": a subclass of pruner ``X`` named ``vpns_<X>`` whose pipeline co-trains the
    visual prompt wherever it trains (``cfg.vp_stages``; fine-tuning for one-shot pruners, every
    round and the fine-tuning for LTH). Registered by the caller."""
    return type(f"VPNsWith{cls.__name__}", (cls,), {
        "name": f"vpns_{cls.name}", "uses_prompt": True,
        "label": f"VPNs w. {cls.label}", "plot_order": cls.plot_order + 10,
        "__doc__": f"VPNs w. {cls.name}: {cls.name} with the visual prompt co-trained "
                   f"(``cfg.vp_stages``).\n\n" + (cls.__doc__ or ""),
        "__module__": cls.__module__,
    })
