"""The :class:`Method` interface and the ``METHODS`` registry.

A method answers *which weights* (an importance → mask, or learned scores) and *when* (once,
iteratively, learned); :class:`vpns_core.train.Trial` owns the one training loop. ``run(trial)``
calls the trial's stages (``trial.run_stage`` / ``trial.run_tune_stage``) and untrained steps
(``trial.run_once``); ``stages(cfg)`` lists the training stages it will run, with their epochs.

The trial also calls a few hooks at fixed points of its loop (``setup``, ``sparsity_report``,
``checkpoint_state`` / ``restore``, ``export_entries``, ``final_metrics``); their defaults serve
the weight methods (masks in :class:`vpns_core.masking.MaskedNetwork`), and the channel methods
(:mod:`vpns_core.methods.channel`) override them. ``label`` and ``plot_order`` are how figures
name and order the method.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..train import Trial

METHODS: Registry["Method"] = Registry("method")
POST_PROMPTS = ("none", "zero_shot", "fine_tune")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    METHODS.add(cls.name, cls())
    return cls


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

    def run(self, trial: "Trial") -> None:
        raise NotImplementedError

    def transfer(self, trial: "Trial") -> None:
        """Fine-tune the mask of ``cfg.mask_file`` (found by any method, on any task) instead of
        finding one: the same tune stage as after this method's own pruning, prompt included."""
        if trial.net.mode != "fixed":
            trial.net.fix(trial.mask_file_masks)
        trial.run_tune_stage()

    # --- hooks of the trial's loop (defaults: weight masks) ---------------------------------

    def weight_sparsity(self, cfg: "Config") -> float:
        """Sparsity of the trial's weight masks (``MaskedNetwork``): ``cfg.sparsity`` for a
        weight pruner, 0 for a method that keeps every weight."""
        return cfg.sparsity if self.prunes else 0.0

    def setup(self, trial: "Trial") -> None:
        """Called once the model and its weight masks are built, before a checkpoint is restored."""

    def sparsity_report(self, trial: "Trial") -> dict[str, float]:
        """``sparsity`` (the method's own), ``sparsity_all_layers`` and ``min_layer_density`` of
        the model now: an epoch row's sparsity columns."""
        if trial.net.mode != "dense":
            return trial.net.sparsity_report()
        return {"sparsity": 0.0, "sparsity_all_layers": 0.0, "min_layer_density": 1.0}

    def checkpoint_state(self, trial: "Trial") -> dict[str, Any]:
        """Entries the method adds to the trial's checkpoint (weights_only-safe values)."""
        return {}

    def restore(self, trial: "Trial", state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved, from the whole checkpoint ``state``, on the
        freshly built trial, before its model's state dict is loaded."""

    def export_entries(self, trial: "Trial") -> dict[str, Any]:
        """Entries the method adds to ``model_export.pt``: by default how to rebuild the plain
        network without vpns (``scripts/load_pruned.py``), its builder and the channel counts of
        every Conv/Linear/BatchNorm (a new linear head's included)."""
        from ..channel_pruning import architecture
        from ..models import builder_spec
        return {"architecture": architecture(trial.model),
                "builder": builder_spec(trial.cfg.model, trial.source.num_source_classes)}

    def final_metrics(self, trial: "Trial") -> dict[str, Any]:
        """Metrics the method adds to the trial's final row."""
        return {}


class PruneThenTrain(Method):
    """Score once at the pretrained weights, keep the top-k (``cfg.allocation``), fine-tune.

    Subclasses give ``importance(trial)``: one tensor per prunable layer, the weight's shape,
    larger = keep. The fine-tuning stage is SGD + cosine on weights (and prompt where used).
    """

    def vp_stages(self, cfg: "Config") -> str:
        stages = super().vp_stages(cfg)
        return {"both": "tune", "mask": "none"}.get(stages, stages)  # no mask-finding training

    def importance(self, trial: "Trial") -> list:
        raise NotImplementedError

    def prune(self, trial: "Trial") -> None:
        trial.net.fix(trial.net.top_k_masks(self.importance(trial)))

    def run(self, trial: "Trial") -> None:
        trial.run_once("prune", lambda: self.prune(trial))
        trial.run_tune_stage()


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
