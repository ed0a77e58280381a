"""Score-based weight masks for every Conv2d and Linear layer (HYDRA / VPNs stage 1 and 2).

A :class:`MaskedNetwork` converts a model's prunable layers between three modes:

- ``dense``: untouched.
- ``score``: the pretrained weight moves to ``weight_orig``, a real-valued ``weight_scores``
  of the same shape is added, and a forward pre-hook sets
  ``weight = weight_orig * 1[|scores| > threshold]`` with a straight-through gradient to the
  scores (HYDRA, Sehwag et al. 2020, Sec. 3; VPNs Eq. 3). Thresholds are recomputed from the
  scores only when the scores changed (their version counters), i.e. once per optimizer step;
  each layer's boolean mask is computed once per change and reused by every forward in between.
- ``fixed``: the binary mask is frozen in ``weight_mask``; ``weight`` is a plain parameter holding
  ``weight_orig * mask`` and a gradient hook zeroes the gradient of pruned entries, so with SGD
  (momentum, weight decay) or Adam the pruned weights stay exactly zero (VPNs stage 2).

Allocation of the kept weights across layers: ``global`` (one threshold over all prunable
layers, as the VPNs/BiP reference), ``layerwise`` (same sparsity in every layer, HYDRA's own
code) or ``erk`` (Erdős–Rényi-Kernel densities, Evci et al. 2020, which respects layer shapes).

``pattern=(n, m)`` makes the masks semi-structured instead (N:M, e.g. 2:4, the pattern Ampere and
later GPUs accelerate): every group of ``m`` consecutive weights along a layer's input dimension
keeps its ``n`` largest scores (:func:`nm_mask`), recomputed after every step like the threshold;
layers whose input dimension is not a multiple of ``m`` stay dense (``ineligible``).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

ALLOCATIONS = ("global", "layerwise", "erk")


class _MaskedWeight(torch.autograd.Function):
    """``weight * mask`` (``mask = 1[|scores| > thr]``) with a straight-through gradient to the
    scores.

    The top-k acts on ``|scores|`` and its gradient is passed straight through to ``|scores|``
    (HYDRA's ``GetSubnet`` on ``scores.abs()``), so ``dL/ds = dL/dw_eff * w * sign(s)``.
    Without the sign, negative scores would climb the loss. The layer keeps ``masked = w * mask``
    up to date (see :func:`_layer_state`) and the forward pass returns it; ``mask`` (0/1 in the
    weight's dtype) is needed only when the weights train too (BiP's lower level), else None.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, mask: Tensor | None, masked: Tensor) -> Tensor:
        ctx.save_for_backward(weight, scores, mask)
        # A view of the layer's buffer: it is rewritten in place only when the scores change,
        # after this graph's backward pass (rewriting it earlier bumps its version counter, and
        # autograd refuses to use the stale graph).
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            if grad.is_contiguous() and grad._base is None and grad_weight is None:
                # The incoming gradient is the layer's fresh weight gradient, used by nothing
                # else: scaled in place.
                grad_scores = score_grad_(grad, weight, scores)
            else:
                grad_scores = grad * weight * scores.sign()
        return grad_weight, grad_scores, None, None


def score_grad_(grad: Tensor, weight: Tensor, scores: Tensor, chunked: bool | None = None) -> Tensor:
    """``grad * weight * sign(scores)``, written into ``grad``. ``chunked`` (the CPU default) runs
    it chunk by chunk (no weight-sized temporaries to allocate and page-fault on a CPU); on a GPU
    (default) it is one pass over the whole tensor, not ~45 chunks of 3 small kernels each."""
    weight, scores = weight.detach(), scores.detach()
    if not (grad.device.type == "cpu" if chunked is None else chunked):
        return grad.mul_(weight).mul_(scores.sign())
    sign = torch.empty(min(_CHUNK, grad.numel()), dtype=grad.dtype, device=grad.device)
    for g, w, s in zip(grad.view(-1).split(_CHUNK), weight.reshape(-1).split(_CHUNK),
                       scores.reshape(-1).split(_CHUNK)):
        g.mul_(w).mul_(torch.sign(s, out=sign[:g.numel()]))
    return grad


# Per score-mode layer, in ``module.__dict__["_vpns_state"]``: ``masked`` (w * 1[|s| > thr]), with
# the tensors and version counters it was computed from, and ``mask`` (0/1) once something asked
# for it. They are rebuilt in place (no fresh
# multi-megabyte allocations, which cost page faults on a CPU) once per change of the scores,
# weights or threshold, in the same pass over the scores as the threshold, and reused by every
# forward in between (training step, evaluation batches, the reference schedule's two steps).
_STATE = "_vpns_state"
_CHUNK = 1 << 18    # values per pass over a layer's scores (fewer ops; L2/L3-sized)


def _state_key(module: nn.Module) -> tuple:
    s, w, t = module.weight_scores, module.weight_orig, module.weight_threshold
    return (s, s._version, w, w._version, t, t._version)


def _same_key(a: tuple, b: tuple) -> bool:
    return all(x is y if isinstance(x, Tensor) else x == y for x, y in zip(a, b))


def _buffer(module: nn.Module) -> Tensor:
    """The layer's ``masked`` buffer (reused, or new)."""
    state = module.__dict__.get(_STATE)
    w = module.weight_orig
    if state is not None and state["masked"].shape == w.shape and state["masked"].dtype == w.dtype:
        return state["masked"]
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.no_grad()
def _refresh_layers(modules: list[nn.Module], k: int) -> None:
    """Threshold = the ``k``-th smallest ``|score|`` over ``modules``, and each layer's ``masked``
    buffer, in one chunked pass over scores and weights."""
    scores = [m.weight_scores.detach().flatten() for m in modules]
    weights = [m.weight_orig.detach().flatten() for m in modules]
    buffers = [_buffer(m) for m in modules]
    masked = [b.view(-1) for b in buffers]

    def on_chunk(i: int, start: int, above: Tensor) -> None:
        stop = start + above.numel()
        torch.mul(weights[i][start:stop], above, out=masked[i][start:stop])

    def on_clear(i: int, index: Tensor) -> None:
        masked[i].index_fill_(0, index, 0)

    thr = _select(scores, k, on_chunk, on_clear)
    for m, masked_m in zip(modules, buffers):
        m.weight_threshold.copy_(thr)
        m.__dict__[_STATE] = {"key": _state_key(m), "masked": masked_m, "mask": None}


def nm_eligible(weight: Tensor, m: int) -> bool:
    """Whether a weight's input dimension (``weight.shape[1]``: in_features, or in_channels per
    group) splits into groups of ``m``."""
    return weight.dim() in (2, 4) and weight.shape[1] % m == 0


def nm_mask(values: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask of ``values``' shape keeping the ``n`` largest of every ``m`` consecutive
    values along the input dimension (for a convolution: ``m`` input channels at each kernel
    position, the layout of NVIDIA's 2:4 convolutions); exactly ``n`` per group (ties: one of
    them, as ``topk`` picks). One ``topk`` over a view of all groups: no loop, no copy of the
    layer (0.04 s for a 512x512x3x3 convolution on one CPU thread)."""
    out, inp, *rest = values.shape
    grouped = values.view(out, inp // m, m, *rest)
    keep = torch.zeros(grouped.shape, dtype=torch.bool, device=values.device)
    keep.scatter_(2, grouped.topk(n, dim=2, sorted=False).indices, True)
    return keep.view(values.shape)


@torch.no_grad()
def _refresh_nm(module: nn.Module, n: int, m: int) -> None:
    """A score-mode layer's N:M mask and masked weight for its current scores."""
    w = module.weight_orig.detach()
    mask = nm_mask(module.weight_scores.detach().abs(), n, m).to(w.dtype)
    masked = _buffer(module)
    torch.mul(w, mask, out=masked)
    module.__dict__[_STATE] = {"key": _state_key(module), "masked": masked, "mask": mask}


def _layer_state(module: nn.Module) -> dict[str, Tensor | None]:
    """``masked`` (and ``mask`` if computed) of a score-mode layer for its current scores,
    weights and threshold; ``MaskedNetwork.refresh`` normally computed it already, else (a layer
    called on its own, a threshold set by hand) it is computed here."""
    state = module.__dict__.get(_STATE)
    if state is None or not _same_key(state["key"], _state_key(module)):
        pattern = module.__dict__.get("_vpns_nm")
        if pattern is not None:
            _refresh_nm(module, *pattern)
            return module.__dict__[_STATE]
        with torch.no_grad():
            s, w = module.weight_scores.detach(), module.weight_orig.detach()
            mask = torch.gt(s.abs(), module.weight_threshold).to(w.dtype)
            masked = _buffer(module)
            torch.mul(w, mask, out=masked)
        state = {"key": _state_key(module), "masked": masked, "mask": mask}
        module.__dict__[_STATE] = state
    return state


def _layer_mask(module: nn.Module, state: dict) -> Tensor:
    if state["mask"] is None:
        state["mask"] = torch.gt(module.weight_scores.detach().abs(), module.weight_threshold).to(
            module.weight_orig.dtype)
    return state["mask"]


def _score_hook(module: nn.Module, _inputs) -> None:
    state = _layer_state(module)
    if torch.is_grad_enabled():
        mask = _layer_mask(module, state) if module.weight_orig.requires_grad else None
        module.weight = _MaskedWeight.apply(module.weight_orig, module.weight_scores, mask, state["masked"])
    else:  # evaluation: no graph, the masked weight as it is
        module.weight = state["masked"]


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
        pattern: ``(n, m)`` for N:M masks (``sparsity`` must be ``1 - n/m``; ``allocation`` is
            then unused); layers whose input dimension is not a multiple of ``m`` stay dense and
            are listed in ``ineligible``.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, allocation: str = "global",
                 exclude: tuple[str, ...] = (), density_floor: float = 0.0,
                 pattern: tuple[int, int] | None = None) -> None:
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
        self.pattern = pattern
        if pattern is not None:
            n_keep, group = pattern
            if not 0 < n_keep < group:
                raise ValueError(f"pattern: N:M needs 0 < N < M, got {n_keep}:{group}")
            if abs(sparsity - (1 - n_keep / group)) > 1e-9:
                raise ValueError(f"sparsity: an {n_keep}:{group} pattern removes {1 - n_keep / group:g} "
                                 f"of each layer's weights, not {sparsity:g}")
        self.ineligible = [n for n, m in all_layers if n not in exclude and pattern is not None
                           and not nm_eligible(_weight_of(m), pattern[1])]
        self.excluded = [(n, m) for n, m in all_layers if n in exclude or n in self.ineligible]
        self.layers = [(n, m) for n, m in all_layers if n not in exclude and n not in self.ineligible]
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
        if self.pattern is not None:
            return [n * self.pattern[0] // self.pattern[1] for n in sizes]
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
            if self.pattern is not None:
                m.__dict__["_vpns_nm"] = self.pattern
            m.weight = weight.detach()
        # first among the pre-hooks, so a model that is itself a prunable layer refreshes first
        self._refresh_handle = self.model.register_forward_pre_hook(lambda *_: self.refresh(), prepend=True)
        self._fused_handle = register_optimizer_step_post_hook(_bump_versions_after_fused_step(self))
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
        """Recompute thresholds and masks if the scores (or weights) changed since the last call."""
        if self.mode != "score":
            return
        versions = self._param_versions()
        if versions == self._versions and not force:
            return
        if self.pattern is not None:  # per layer, one topk over its groups
            for _, m in self.layers:
                _refresh_nm(m, *self.pattern)
            self._versions = self._param_versions()
            return
        if self.allocation == "global":
            groups = [([m for _, m in self.layers], self.total - self.global_keep)]
        else:
            groups = [([m], m.weight_scores.numel() - keep)
                      for (_, m), keep in zip(self.layers, self.keep_counts)]
        for modules, k in groups:
            _refresh_layers(modules, k)
        self._versions = self._param_versions()

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(v for _, m in self.layers for v in (m.weight_scores._version, m.weight_orig._version))

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
        if self.pattern is not None:  # the pattern fixes the count: n of every m, per group
            return {n: nm_mask(v.detach().view(_weight_of(m).shape), *self.pattern)
                    for (n, m), v in zip(self.layers, importance)}
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
            self._fused_handle.remove()
        for n, m in self.layers:
            mask = masks[n].to(device=_weight_of(m).device, dtype=torch.bool)
            if mask.shape != _weight_of(m).shape:
                raise ValueError(f"mask for {n} has shape {tuple(mask.shape)}, "
                                 f"weight has {tuple(_weight_of(m).shape)}")
            base = _weight_of(m).detach()
            if self.mode == "score":
                m._vpns_hook.remove()
                del m._vpns_hook, m.weight
                m.__dict__.pop(_STATE, None)
                m.__dict__.pop("_vpns_nm", None)
                del m._parameters["weight_orig"], m._parameters["weight_scores"]
                del m._buffers["weight_threshold"]
            else:
                del m._parameters["weight"]
            if "weight_mask" in m._buffers:
                del m._buffers["weight_mask"]
            m.register_buffer("weight_mask", mask)
            weight = nn.Parameter(base * mask)
            m.register_parameter("weight", weight)
            # a 0/1 copy in the weight's dtype: multiplying by a boolean mask casts it every step
            weight.register_hook(lambda g, scale=mask.to(base.dtype): g * scale)
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


def _bump_versions_after_fused_step(net: MaskedNetwork):
    """An optimizer post-step hook: fused optimizers (``fused=True``) update parameters in place
    without bumping their version counters, which ``refresh`` and the mask caches rely on to see
    that scores (or BiP's weights) changed; bump them for this network's parameters. The flag
    is read per parameter group, as the optimizers do (a group may set ``fused`` itself)."""
    ref = weakref.ref(net)

    def hook(optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
        net = ref()
        if net is None or net.mode != "score":
            return
        ours = {id(t) for _, m in net.layers for t in (m.weight_scores, m.weight_orig)}
        touched = [p for g in optimizer.param_groups if g.get("fused") for p in g["params"]
                   if id(p) in ours]
        if touched:
            increment_version(touched)

    return hook


def _weight_of(m: nn.Module) -> Tensor:
    return m.weight_orig if "weight_orig" in m._parameters else m.weight


_SAMPLE = 1 << 16   # values sampled to bracket the k-th smallest


def _sparse_nonzero(flags: Tensor) -> Tensor:
    """``flags.nonzero()`` of a sparse 1-D boolean tensor, about 2x faster on a CPU: ``nonzero``
    first finds the 8-byte words holding any True, then looks inside those words only."""
    if flags.numel() % 8 or flags.device.type != "cpu" or flags.storage_offset() % 8:
        return flags.nonzero().squeeze(1)
    packed = flags.view(torch.int64)
    words = packed.nonzero().squeeze(1)
    row, col = packed.index_select(0, words).view(torch.bool).view(-1, 8).nonzero(as_tuple=True)
    return words.index_select(0, row) * 8 + col


def kth_smallest(values: Tensor, k: int, method: str | None = None) -> Tensor:
    """The ``k``-th smallest (1-based) of a 1-D tensor, as a 0-d tensor on its device.
    ``method``: ``kthvalue`` (the CPU default: a selection, linear time) or ``sort`` (the default
    elsewhere: CUDA's ``kthvalue`` is many times slower than its radix sort on millions of
    values, pytorch/pytorch#75599). Both return exactly the same value; neither syncs with the
    host."""
    method = method or ("kthvalue" if values.device.type == "cpu" else "sort")
    if method == "kthvalue":
        return torch.kthvalue(values, k).values
    if method == "sort":
        return torch.sort(values).values[k - 1]
    raise ValueError(f"method: choose from kthvalue, sort (got {method!r})")


@torch.no_grad()
def kth_smallest_abs(tensors: list[Tensor], k: int, masks_out: list[Tensor] | None = None) -> Tensor:
    """The ``k``-th smallest of ``|t|`` over all ``tensors`` (exactly ``torch.kthvalue`` of their
    concatenation; ``-inf`` for ``k <= 0``), as a 0-d tensor. With ``masks_out`` (contiguous
    tensors of the same shapes, boolean or floating) also writes ``|t| > value`` into them.

    ``kthvalue`` over millions of scores costs more than a ResNet-18 training step on a CPU, and
    stage 1 needs it after every optimizer step. On the CPU the value is therefore bracketed by
    quantiles of a strided sample of ``_SAMPLE`` values; one chunked, in-cache pass counts the
    values below the bracket and gathers those inside it (about 1% of them); ``kthvalue`` runs
    on the band only. If the bracket misses, the full ``kthvalue`` runs. Same result, about 6x
    faster for ResNet-18. On other devices (no host synchronisation wanted) it is one
    :func:`kth_smallest` (a sort on CUDA).
    """
    outs = [m.view(-1) for m in masks_out] if masks_out is not None else None

    def write(i: int, start: int, above: Tensor) -> None:
        outs[i][start:start + above.numel()].copy_(above)

    def clear(i: int, index: Tensor) -> None:
        outs[i].index_fill_(0, index, 0)

    return _select(tensors, k, write if outs else None, clear if outs else None)


def _select(tensors: list[Tensor], k: int, on_chunk=None, on_clear=None) -> Tensor:
    """:func:`kth_smallest_abs`'s selection. ``on_chunk(i, start, above)`` receives, chunk by
    chunk of tensor ``i`` (flattened) from ``start``, 0/1 values that equal ``|t| > value`` except
    at the positions later passed to ``on_clear(i, index)``, which must be set to 0."""
    device = tensors[0].device
    flat = [t.detach().flatten() for t in tensors]
    n = sum(f.numel() for f in flat)

    def exact() -> Tensor:
        value = (kth_smallest(torch.cat(flat).abs() if len(flat) > 1 else flat[0].abs(), k)
                 if k > 0 else torch.tensor(float("-inf"), device=device))
        for i, f in enumerate(flat if on_chunk is not None else []):
            on_chunk(i, 0, torch.gt(f.abs(), value).to(f.dtype))
        return value

    if k <= 0 or device.type != "cpu" or n <= 4 * _SAMPLE:
        return exact()
    stride = n // _SAMPLE
    sample = torch.cat([f[::stride] for f in flat]).abs()
    m, q = sample.numel(), k / n
    margin = 5.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m  # 5 sigma of a sample quantile
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = torch.kthvalue(sample, lo_rank).values if lo_rank >= 1 else sample.new_tensor(-math.inf)
    hi = torch.kthvalue(sample, hi_rank).values if hi_rank <= m else sample.new_tensor(math.inf)
    # Preallocated, cache-sized work buffers (a fresh megabyte per op costs page faults), 0/1
    # floats rather than booleans (comparisons and sums run about 3x faster on a CPU), and the
    # band's positions gathered once per tensor: few ops per chunk.
    work = torch.empty(2, min(n, _CHUNK), dtype=flat[0].dtype, device=device)
    flags = torch.empty(max(f.numel() for f in flat), dtype=torch.bool, device=device)
    kept, band_values, band_index = [], [], []
    for i, f in enumerate(flat):
        for j, (chunk, flag) in enumerate(zip(f.split(_CHUNK), flags[:f.numel()].split(_CHUNK))):
            size = chunk.numel()
            a = torch.abs(chunk, out=work[0, :size])
            above = torch.gt(a, lo, out=work[1, :size])
            kept.append(above.sum())
            if on_chunk is not None:
                on_chunk(i, j * _CHUNK, above)
            flag.copy_(torch.le(a, hi, out=work[0, :size]).mul_(above))  # lo < |t| <= hi
        index = _sparse_nonzero(flags[:f.numel()])
        band_index.append(index)
        band_values.append(f.index_select(0, index).abs())
    below = n - int(torch.stack(kept).sum())
    values = torch.cat(band_values)
    if not 0 < k - below <= values.numel():  # the bracket missed (rare): select exactly
        return exact()
    value = torch.kthvalue(values, k - below).values
    if on_clear is not None:  # ties at the value are pruned, as in ``|t| > value``
        for i, (index, v) in enumerate(zip(band_index, band_values)):
            on_clear(i, index[v <= value])
    return value


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
