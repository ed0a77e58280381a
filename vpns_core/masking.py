"""Score-based weight masks for every Conv2d and Linear layer (HYDRA / VPNs stage 1 and 2).

A :class:`MaskedNetwork` converts a model's prunable layers between three modes:

- ``dense``: untouched.
- ``score``: the pretrained weight moves to ``weight_orig``, a real-valued ``weight_scores``
  of the same shape is added, and a forward pre-hook sets
  ``weight = weight_orig * 1[|scores| > threshold]`` with a straight-through gradient to the
  scores (HYDRA, Sehwag et al. 2020, Sec. 3; VPNs Eq. 3). Thresholds are recomputed from the
  scores only when the scores changed (their version counters), i.e. once per optimizer step.
- ``fixed``: the binary mask is frozen in ``weight_mask``; ``weight`` is a plain parameter holding
  ``weight_orig * mask`` and a gradient hook zeroes the gradient of pruned entries, so with SGD
  (momentum, weight decay) or Adam the pruned weights stay exactly zero (VPNs stage 2).

Allocation of the kept weights across layers: ``global`` (one threshold over all prunable
layers, as the VPNs/BiP reference), ``layerwise`` (same sparsity in every layer, HYDRA's own
code) or ``erk`` (Erdős–Rényi-Kernel densities, Evci et al. 2020, which respects layer shapes).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ALLOCATIONS = ("global", "layerwise", "erk")
MODES = ("dense", "score", "fixed")


class _MaskedWeight(torch.autograd.Function):
    """``weight * 1[|scores| > thr]`` with a straight-through gradient to the scores.

    The top-k acts on ``|scores|`` and its gradient is passed straight through to ``|scores|``
    (HYDRA's ``GetSubnet`` on ``scores.abs()``), so ``dL/ds = dL/dw_eff * w * sign(s)``.
    Without the sign, negative scores would climb the loss.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = grad * weight * scores.sign() if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None


def _score_hook(module: nn.Module, _inputs) -> None:
    mask = (module.weight_scores.abs() > module.weight_threshold).to(module.weight_orig.dtype)
    module.weight = _MaskedWeight.apply(module.weight_orig, module.weight_scores, mask)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Conv2d and Linear layers in registration order, with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def scaled_score_init(weight: Tensor) -> Tensor:
    """HYDRA's scaled init ``sqrt(6 / fan_in) * w / max|w|`` (fan_in per group)."""
    fan_in = weight[0].numel()
    return math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(1e-12)


def erk_densities(shapes: list[torch.Size], density: float) -> list[float]:
    """Erdős–Rényi-Kernel layer densities with ``sum(d_l * n_l) == density * sum(n_l)``.

    Raw density of a layer is ``sum(shape) / prod(shape)``; layers whose scaled density would
    exceed 1 are kept dense and the scale is solved again for the rest (Evci et al. 2020, App. A).
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    budget = density * sum(sizes)
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            return [1.0] * len(shapes)
        rest = budget - sum(sizes[i] for i in dense)
        eps = rest / sum(raw[i] * sizes[i] for i in free)
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.update(over)


@dataclass
class LayerStats:
    name: str
    numel: int
    kept: int
    pruned: bool  # whether the layer takes part in pruning

    @property
    def density(self) -> float:
        return self.kept / self.numel


class MaskedNetwork:
    """Masks over a model's prunable layers.

    Args:
        model: the network, modified in place.
        sparsity: fraction of the prunable weights to remove, in [0, 1).
        allocation: one of :data:`ALLOCATIONS`.
        exclude: qualified names of Conv2d/Linear layers to keep dense (e.g. head, first conv).
        density_floor: layers whose target density falls below it are reported in ``warnings``.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, allocation: str = "global",
                 exclude: tuple[str, ...] = (), density_floor: float = 0.0) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: unknown '{allocation}'; choose from {', '.join(ALLOCATIONS)}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity: must be in [0, 1), got {sparsity}")
        self.model = model
        self.sparsity = sparsity
        self.allocation = allocation
        all_layers = prunable_layers(model)
        unknown = set(exclude) - {n for n, _ in all_layers}
        if unknown:
            raise ValueError(f"exclude: not prunable layers: {sorted(unknown)}")
        self.excluded = [(n, m) for n, m in all_layers if n in exclude]
        self.layers = [(n, m) for n, m in all_layers if n not in exclude]
        if not self.layers:
            raise ValueError("no prunable layers left after exclusions")
        self.mode = "dense"
        self._versions: tuple[int, ...] | None = None
        self._refresh_handle = None
        self.density_floor = density_floor
        self.keep_counts = self._keep_counts()
        self.warnings: list[str] = []
        if allocation != "global":  # global densities are known only once scores exist (fix())
            self._warn_floor({n: k / m.weight.numel()
                              for (n, m), k in zip(self.layers, self.keep_counts)})

    def _warn_floor(self, densities: dict[str, float]) -> None:
        hits = [n for n, d in densities.items() if d < self.density_floor]
        if hits:
            message = (f"{len(hits)} layer(s) below density floor {self.density_floor}: "
                       + ", ".join(hits[:8]) + (" ..." if len(hits) > 8 else ""))
            self.warnings.append(message)
            warnings.warn(message, stacklevel=3)

    # --- allocation -------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return sum(_weight_of(m).numel() for _, m in self.layers)

    def _keep_counts(self, sparsity: float | None = None) -> list[int]:
        """Target number of kept weights per layer at ``sparsity`` (default: the network's);
        sums to ``global_keep`` for global allocation."""
        sparsity = self.sparsity if sparsity is None else sparsity
        sizes = [_weight_of(m).numel() for _, m in self.layers]
        if self.allocation == "layerwise":
            return [n - round(sparsity * n) for n in sizes]
        if self.allocation == "erk":
            dens = erk_densities([_weight_of(m).shape for _, m in self.layers], 1.0 - sparsity)
            return [min(n, max(1, round(d * n))) for d, n in zip(dens, sizes)]
        # Global: per-layer counts are decided by the scores; this is only the expected share.
        return [round(self._global_keep(sparsity) * n / self.total) for n in sizes]

    # --- modes ------------------------------------------------------------------------------

    def attach_scores(self, init: str = "scaled") -> list[nn.Parameter]:
        """Switch to ``score`` mode: freeze weights, add scores, return the score parameters."""
        if self.mode != "dense":
            raise RuntimeError(f"attach_scores needs dense mode, not {self.mode}")
        for _, m in self.layers:
            weight = m.weight
            del m._parameters["weight"]
            m.register_parameter("weight_orig", nn.Parameter(weight.detach(), requires_grad=False))
            s = scaled_score_init(weight.detach()) if init == "scaled" else weight.detach().clone()
            m.register_parameter("weight_scores", nn.Parameter(s))
            m.register_buffer("weight_threshold", torch.zeros((), device=weight.device))
            m._vpns_hook = m.register_forward_pre_hook(_score_hook)
            m.weight = weight.detach()
        self._refresh_handle = self.model.register_forward_pre_hook(lambda *_: self.refresh())
        self.mode = "score"
        self._versions = None
        self.refresh()
        return self.scores()

    def scores(self) -> list[nn.Parameter]:
        return [m.weight_scores for _, m in self.layers]

    @torch.no_grad()
    def set_scores(self, values: list[Tensor]) -> None:
        """Overwrite the scores (e.g. with another method's importance) in score mode."""
        for s, v in zip(self.scores(), values):
            s.copy_(v)

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Recompute the thresholds from the scores if they changed since the last call."""
        if self.mode != "score":
            return
        versions = tuple(s._version for s in self.scores())
        if versions == self._versions and not force:
            return
        if self.allocation == "global":
            flat = torch.cat([s.detach().abs().flatten() for s in self.scores()])
            thr = _kth_smallest(flat, self.total - self.global_keep)
            for _, m in self.layers:
                m.weight_threshold.copy_(thr)
        else:
            for (_, m), keep in zip(self.layers, self.keep_counts):
                m.weight_threshold.copy_(_kth_smallest(m.weight_scores.detach().abs().flatten(),
                                                       m.weight_scores.numel() - keep))
        self._versions = tuple(s._version for s in self.scores())

    @property
    def global_keep(self) -> int:
        return self._global_keep(self.sparsity)

    def _global_keep(self, sparsity: float) -> int:
        return self.total - round(sparsity * self.total)

    @torch.no_grad()
    def current_masks(self) -> dict[str, Tensor]:
        """Boolean masks, exact in count: top-k of |scores|."""
        if self.mode == "fixed":
            return {n: m.weight_mask.clone() for n, m in self.layers}
        if self.mode != "score":
            raise RuntimeError("no masks in dense mode")
        return self.top_k_masks([m.weight_scores.detach().abs() for _, m in self.layers])

    @torch.no_grad()
    def top_k_masks(self, importance: list[Tensor], sparsity: float | None = None) -> dict[str, Tensor]:
        """Masks keeping the largest ``importance`` values (one tensor per layer, the weight's
        shape; larger = keep) under this network's allocation at ``sparsity`` (default: the
        network's). Exact in count: ``global_keep`` weights in all, or the allocation's count per
        layer; ``-inf`` entries are kept only when nothing else is left. Any mode."""
        sparsity = self.sparsity if sparsity is None else sparsity
        if len(importance) != len(self.layers):
            raise ValueError(f"importance: {len(importance)} tensors for {len(self.layers)} layers")
        flat = [v.detach().flatten() for v in importance]
        if self.allocation == "global":
            allv = torch.cat(flat)
            chosen = torch.zeros_like(allv, dtype=torch.bool)
            chosen[torch.topk(allv, self._global_keep(sparsity), sorted=False).indices] = True
            parts = chosen.split([v.numel() for v in flat])
        else:
            parts = []
            for v, keep in zip(flat, self._keep_counts(sparsity)):
                chosen = torch.zeros_like(v, dtype=torch.bool)
                chosen[torch.topk(v, keep, sorted=False).indices] = True
                parts.append(chosen)
        return {n: p.view(_weight_of(m).shape) for (n, m), p in zip(self.layers, parts)}

    def fix(self, masks: dict[str, Tensor] | None = None) -> None:
        """Switch to ``fixed`` mode with ``masks`` (default: binarise the current scores).

        Weights become ``weight_orig * mask`` and are trainable; pruned entries get zero
        gradient, so they stay exactly zero under SGD/Adam with momentum and weight decay.
        """
        if masks is None:
            if self.mode == "fixed":
                return
            masks = self.current_masks()
            if self.allocation == "global":
                self._warn_floor({n: float(m.float().mean()) for n, m in masks.items()})
        missing = {n for n, _ in self.layers} - set(masks)
        if missing:
            raise ValueError(f"masks missing for layers: {sorted(missing)[:5]}")
        if self.mode == "score":
            self._refresh_handle.remove()
        for n, m in self.layers:
            mask = masks[n].to(device=_weight_of(m).device, dtype=torch.bool)
            if mask.shape != _weight_of(m).shape:
                raise ValueError(f"mask for {n} has shape {tuple(mask.shape)}, "
                                 f"weight has {tuple(_weight_of(m).shape)}")
            base = _weight_of(m).detach()
            if self.mode == "score":
                m._vpns_hook.remove()
                del m._vpns_hook, m.weight
                del m._parameters["weight_orig"], m._parameters["weight_scores"]
                del m._buffers["weight_threshold"]
            else:
                del m._parameters["weight"]
            if "weight_mask" in m._buffers:
                del m._buffers["weight_mask"]
            m.register_buffer("weight_mask", mask)
            weight = nn.Parameter(base * mask)
            m.register_parameter("weight", weight)
            weight.register_hook(lambda g, mask=mask: g * mask)
        self.mode = "fixed"

    # --- reporting --------------------------------------------------------------------------

    def layer_stats(self) -> list[LayerStats]:
        """Realised kept counts per layer (excluded layers reported dense)."""
        masks = self.current_masks() if self.mode != "dense" else {}
        stats = [LayerStats(n, m.weight.numel() if self.mode == "dense" else masks[n].numel(),
                            int(masks[n].sum()) if n in masks else _weight_of(m).numel(), True)
                 for n, m in self.layers]
        stats += [LayerStats(n, m.weight.numel(), m.weight.numel(), False) for n, m in self.excluded]
        return stats

    def sparsity_report(self) -> dict[str, float]:
        """Realised sparsity over the pruned layers and over all Conv2d/Linear weights."""
        stats = self.layer_stats()
        pruned = [s for s in stats if s.pruned]
        total = sum(s.numel for s in pruned)
        kept = sum(s.kept for s in pruned)
        all_total = sum(s.numel for s in stats)
        all_kept = sum(s.kept for s in stats)
        return {
            "sparsity": 1.0 - kept / total,
            "sparsity_all_layers": 1.0 - all_kept / all_total,
            "min_layer_density": min(s.density for s in pruned),
            "prunable_weights": float(total),
        }


def _weight_of(m: nn.Module) -> Tensor:
    return m.weight_orig if "weight_orig" in m._parameters else m.weight


def _kth_smallest(flat: Tensor, k: int) -> Tensor:
    """Value with ``k`` entries at or below it (``-inf`` for ``k == 0``), as a 0-d tensor."""
    if k <= 0:
        return torch.tensor(float("-inf"), device=flat.device)
    return torch.kthvalue(flat, k).values


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Multiply the weights of ``model`` (a plain copy) by ``masks`` in place; returns it."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.device, modules[name].weight.dtype))
    return model


def plain_state_dict(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of a plain (vpns-free) copy of ``model`` with ``masks`` applied.

    ``weight_orig``/``weight_scores``/``weight_threshold``/``weight_mask`` entries are folded into
    ``weight``, so e.g. ``torchvision.models.resnet18().load_state_dict(sd)`` works.
    """
    skip = ("weight_orig", "weight_scores", "weight_threshold", "weight_mask")
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, value in list(module._parameters.items()) + list(module._buffers.items()):
            if value is None or key in skip or key in module._non_persistent_buffers_set:
                continue
            out[prefix + key] = value.detach().clone()
        if name in masks:
            weight = _weight_of(module).detach()
            out[prefix + "weight"] = weight * masks[name].to(weight.device, weight.dtype)
    return out
