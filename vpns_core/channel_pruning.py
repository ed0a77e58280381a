"""The mechanism of channel (structured) pruning, through torch-pruning's dependency graph:
groups, gates, physical removal and the pruned architecture (its measurement against the dense
model is :func:`vpns_core.costs.compare`). Which channels go
(an importance per group, a torch-pruning pruner, a sparse-training penalty) is the channel
methods' part: :mod:`vpns_core.methods.channel`.

A :class:`ChannelPruner` wraps the torch-pruning pruner a channel method builds on the model. Its
dependency graph (DepGraph, Fang et al. 2023) groups every output channel with everything that
must go with it: the BatchNorm after the conv, the next layers' input channels, depthwise convs,
and all the layers tied by residual additions. Each *group* is pruned as one unit, identified by
its root module (a Conv2d or Linear whose output channels define it).

Learned channel scores (structured VPNs) act through a straight-through top-k *channel gate* (the
channel analogue of HYDRA's weight masks, :mod:`vpns_core.masking`). The gate multiplies the
channel where it enters every *consumer* of the group (each Conv/Linear whose input channels the
group prunes: the next convs, the classifier), so a gated channel contributes exactly nothing, as
if removed, whatever lies between (BatchNorm shifts, activations, residual additions). Gating
consumer inputs rather than BatchNorm outputs keeps the straight-through gradient alive for gated
channels: a zero placed before a ReLU would get ReLU'(0) = 0 and could never come back.

The number of channels removed per group is torch-pruning's (``pruning_ratio`` of every group
with ``layerwise`` allocation, one ranking over all groups with ``global``); the physical
removal is torch-pruning's ``group.prune()``. The model stays an ordinary module of the same
class with fewer channels; :func:`architecture` describes its new shapes so that
``scripts/load_pruned.py`` rebuilds it with plain torch/torchvision code.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .methods.channel import ChannelMethod

CHANNEL_ALLOCATIONS = ("layerwise", "global")


class _Lazy:
    """torch-pruning, imported on first use: only channel methods need it, and importing it
    costs about a second in every trial and sweep driver."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("torch_pruning"), name)


tp = _Lazy()


def _in_fns() -> tuple[Callable, ...]:
    return (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


class _ChannelGate(torch.autograd.Function):
    """``1[channel kept]`` from ``|scores|`` with a straight-through gradient to the scores:
    ``dL/ds = dL/dgate * sign(s)`` (the top-k acts on ``|s|``, as HYDRA's ``GetSubnet``)."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(scores)
        return keep.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scores,) = ctx.saved_tensors
        return grad * scores.sign(), None


@dataclass
class ChannelGroup:
    """One dependency group: ``root`` names the module whose output channels define it."""

    root: str
    channels: int
    #: consumers: (module, its input positions in the group, the root channel of each position)
    gates: list[tuple[nn.Module, Tensor, Tensor]] = field(default_factory=list)


def _root_fn(module: nn.Module) -> Callable:
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


class ChannelPruner(nn.Module):
    """Channel groups of ``model``, their importance and gates, and their physical removal.

    ``method`` (a channel method, :mod:`vpns_core.methods.channel`) builds the torch-pruning pruner and its
    importance. ``sparsity`` is the fraction of channels removed (per group with
    ``allocation='layerwise'``, over all groups with ``'global'``). ``ignored`` modules keep their
    output channels (the classifier head: its outputs are the classes). ``reg`` is the sparse
    training penalty of the methods that have one (None: torch-pruning's default). Built in eval
    mode, so tracing leaves the BatchNorm statistics untouched.
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor, sparsity: float, *,
                 method: "ChannelMethod", allocation: str = "layerwise",
                 ignored: tuple[nn.Module, ...] = (), reg: float | None = None) -> None:
        super().__init__()
        if not getattr(method, "structured", False):
            raise ValueError(f"method: '{getattr(method, 'name', method)}' is not a channel method; "
                             f"choose one of vpns_core.methods.channel (vpns_structured, slim, depgraph)")
        if allocation not in CHANNEL_ALLOCATIONS:
            raise ValueError(f"channel_allocation: unknown '{allocation}'; choose from {', '.join(CHANNEL_ALLOCATIONS)}")
        self.model_ref = [model]  # not a submodule: the model is not part of this module's state
        self.method = method
        self.sparsity = sparsity
        self.scores = nn.ParameterDict()
        self.names = {m: n for n, m in model.named_modules()}
        self.removed: dict[str, list[int]] | None = None
        #: parameters before removal, and the largest change of the logits removal caused
        self.dense_params = count_parameters(model)
        self.removal_max_abs_diff: float | None = None
        self._hooks: list[Any] = []
        self._fixed: dict[str, Tensor] | None = None
        self._gates: dict[str, Tensor] = {}
        common = dict(example_inputs=example_inputs, pruning_ratio=sparsity,
                      global_pruning=allocation == "global", ignored_layers=list(ignored),
                      max_pruning_ratio=0.95 if allocation == "global" else 1.0)
        was_training = model.training
        model.eval()
        try:
            self.pruner = method.pruner(self, model, reg, **common)
        finally:
            model.train(was_training)
        self.groups = self._groups()
        self.total_channels = sum(g.channels for g in self.groups.values())

    @property
    def model(self) -> nn.Module:
        return self.model_ref[0]

    # --- groups -----------------------------------------------------------------------------

    def _groups(self) -> dict[str, ChannelGroup]:
        out: dict[str, ChannelGroup] = {}
        for group in self.pruner.DG.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                                   root_module_types=self.pruner.root_module_types):
            root = group[0].dep.target.module
            name = self.names[root]
            channels = self.pruner.DG.get_out_channels(root)
            entry = ChannelGroup(name, channels)
            for item in group:
                module, fn = item.dep.target.module, item.dep.handler
                if fn not in _in_fns() or not isinstance(module, (nn.Conv2d, nn.Linear)):
                    continue
                pairs = [(int(i), int(r)) for i, r in zip(item.idxs, item.root_idxs) if r is not None]
                if pairs:
                    positions, roots = (torch.tensor(v, dtype=torch.long) for v in zip(*pairs))
                    entry.gates.append((module, positions, roots))
            out[name] = entry
        return out

    def plan(self) -> dict[str, list[int]]:
        """Channels torch-pruning removes from each group (root channel indices) under the
        current importance; groups left whole are absent. Nothing is changed."""
        self.pruner.reset()
        was_training = self.model.training
        self.model.eval()
        try:
            plan = {}
            for group in self.pruner.step(interactive=True):
                name = self.names[group[0].dep.target.module]
                plan[name] = sorted(int(i) for i in group[0].idxs)
        finally:
            self.model.train(was_training)
            self.pruner.reset()
        return plan

    # --- learned scores and gates (structured VPNs) -----------------------------------------

    def attach_scores(self, init_scale: float = 0.1) -> list[nn.Parameter]:
        """One score per channel of every group, initialised to the group's DepGraph magnitude
        (L2 over its coupled parameters, normalised to mean ``init_scale``), and gates that keep
        the top channels of each group by ``|score|``; the per-group counts are torch-pruning's."""
        magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for group in self.pruner.DG.get_all_groups(ignored_layers=self.pruner.ignored_layers,
                                                       root_module_types=self.pruner.root_module_types):
                name = self.names[group[0].dep.target.module]
                imp = magnitude(group)
                if imp is None:
                    imp = torch.ones(self.groups[name].channels)
                self.scores[_key(name)] = nn.Parameter(init_scale * imp.float().to(device))
        self.counts = {name: len(idxs) for name, idxs in self.plan().items()}
        self._install()
        return list(self.scores.values())

    def scores_of(self, name: str) -> Tensor | None:
        key = _key(name)
        return self.scores[key] if key in self.scores else None

    def fix(self, plan: dict[str, list[int]]) -> None:
        """Gate the channels of ``plan`` to zero (no learning): the model computes exactly what
        the model with those channels removed computes."""
        self._fixed = {}
        for name, g in self.groups.items():
            keep = torch.ones(g.channels, dtype=torch.bool)
            keep[plan.get(name, [])] = False
            self._fixed[name] = keep
        self._install()

    def _install(self) -> None:
        self._remove_hooks()
        self._device = next(self.model.parameters()).device
        self._hooks.append(self.model.register_forward_pre_hook(self._compute_gates))
        for name, g in self.groups.items():
            for module, positions, roots in g.gates:
                self._hooks.append(module.register_forward_pre_hook(_GateHook(self, name, positions, roots)))

    def _compute_gates(self, _module, _inputs) -> None:
        gates = {}
        for name, g in self.groups.items():
            if self._fixed is not None:
                gates[name] = self._fixed[name].to(device=self._device, dtype=torch.float32)
                continue
            s = self.scores_of(name)
            n = self.counts.get(name, 0)
            if s is None or n == 0:
                continue
            keep = torch.ones_like(s, dtype=torch.bool)
            keep[torch.topk(s.detach().abs(), n, largest=False).indices] = False
            gates[name] = _ChannelGate.apply(s, keep)
        self._gates = gates

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- physical removal -------------------------------------------------------------------

    def remove(self, plan: dict[str, list[int]]) -> None:
        """Physically remove the channels of ``plan`` (torch-pruning ``group.prune()``): convs,
        BatchNorms, linears and every coupled layer get smaller; gates and scores are dropped."""
        self._remove_hooks()
        self._fixed = None
        self._gates = {}
        modules = dict(self.model.named_modules())
        for name, idxs in plan.items():
            root = modules[name]
            group = self.pruner.DG.get_pruning_group(root, _root_fn(root), list(idxs))
            if not self.pruner.DG.check_pruning_group(group):
                raise RuntimeError(f"channel plan: group '{name}' cannot lose channels {idxs[:5]}…")
            group.prune()
        self.scores = nn.ParameterDict()
        self.removed = {k: list(v) for k, v in plan.items()}

    def remove_checked(self, plan: dict[str, list[int]], inputs: Tensor) -> float:
        """Gate the channels of ``plan`` to zero, record the logits of ``inputs``, remove the
        channels physically and check the smaller model computes the same logits; returns (and
        keeps as ``removal_max_abs_diff``) the largest difference. The model is left in eval mode.

        Raises:
            RuntimeError: a difference beyond float tolerance (gates and removal disagree).
        """
        self.fix(plan)
        self.model.eval()
        with torch.no_grad():
            before = self.model(inputs).float()
            self.remove(plan)
            after = self.model(inputs).float()
        diff = (after - before).abs().max().item()
        self.removal_max_abs_diff = diff
        if not diff <= 1e-3 * max(1.0, before.abs().max().item()):
            raise RuntimeError(f"channel removal changed the outputs by {diff:.3g}: the gates do not "
                               f"match the removed channels for model {type(self.model).__name__}")
        return diff

    # --- regularised (sparse) training of the baselines --------------------------------------

    def regularize(self) -> None:
        """Add the method's sparse-training penalty's gradient (after backward), where it has one
        (``ChannelMethod.sparse_training``): the pruner's ``regularize``."""
        if self.method.sparse_training:
            self.pruner.regularize(self.model)

    # --- reporting --------------------------------------------------------------------------

    def report(self) -> dict[str, float]:
        """Channel sparsity (planned by the gates, or realised after removal) and the smallest
        fraction of channels kept in a group."""
        if self.removed is not None:
            pruned = {k: len(v) for k, v in self.removed.items()}
        elif self._fixed is not None:
            pruned = {k: int((~v).sum()) for k, v in self._fixed.items()}
        else:
            pruned = getattr(self, "counts", {})
        kept = [1 - pruned.get(n, 0) / g.channels for n, g in self.groups.items()]
        return {"channel_sparsity": sum(pruned.values()) / max(1, self.total_channels),
                "min_group_density": min(kept, default=1.0)}

    def state(self) -> dict[str, Any]:
        return {"removed": self.removed,
                "scores": {k: v.detach().cpu() for k, v in self.scores.items()},
                "counts": getattr(self, "counts", None)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore removal or scores saved by :meth:`state` (on a freshly built dense model)."""
        if state.get("removed") is not None:
            self.remove(state["removed"])
            return
        if state.get("scores"):
            device = next(self.model.parameters()).device
            for k, v in state["scores"].items():
                self.scores[k] = nn.Parameter(v.to(device))
            self.counts = dict(state["counts"])
            self._install()


class _GateHook:
    """Forward pre-hook of a consumer: multiply its input channels ``positions`` by the group's
    gate at ``roots`` (other input channels, e.g. of other groups after a concat, pass as 1)."""

    def __init__(self, owner: ChannelPruner, name: str, positions: Tensor, roots: Tensor) -> None:
        self.owner, self.name, self.positions, self.roots = owner, name, positions, roots

    def __call__(self, module: nn.Module, inputs: tuple) -> tuple | None:
        gate = self.owner._gates.get(self.name)
        if gate is None:
            return None
        if self.roots.device != gate.device:
            self.positions, self.roots = self.positions.to(gate.device), self.roots.to(gate.device)
        x = inputs[0]
        size = x.shape[1]
        full = torch.ones(size, device=gate.device, dtype=gate.dtype).index_copy(
            0, self.positions, gate.index_select(0, self.roots))
        return (x * full.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))), *inputs[1:])


def _key(name: str) -> str:
    return name.replace(".", "__") or "_root"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- architecture description (loads without vpns: scripts/load_pruned.py) -----------------

_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def architecture(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per module with channel attributes (Conv, Linear, BatchNorm): those attributes, so that a
    freshly built model of the same class can be resized to this one before ``load_state_dict``."""
    out = {}
    for name, m in model.named_modules():
        attrs = {a: int(getattr(m, a)) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), int)}
        if attrs:
            out[name] = attrs
    return out
