"""What a deployed model costs: parameters (nonzeros under weight masks), FLOPs and measured
latency, with the device and thread count the latency was measured on. The one module that
measures: the trial's cost record (:func:`trial_costs`), the channel methods' dense-versus-pruned
comparison (:func:`compare`) and the Pareto sweep's re-timing of exported candidates
(``sweeps/multiobjective.py``) all call the functions here.

The cost record is measured only where a sweep reads it: a trial with ``cfg.cost_record`` (the
Pareto, structured and N:M-budget search spaces turn it on) ends with :func:`trial_costs`,
measured on the model it exports: the smaller network of a channel method, the dense-shaped
network with the masks applied for a weight method, the network itself for dense fine-tuning.
Other trials skip it. ``cfg.count_flops`` counts FLOPs, ``cfg.measure_repeats`` times the
latency (0 skips the timing).

Unstructured sparsity saves nothing on dense kernels, so a weight-masked model's latency and
``flops_g`` are the dense model's; ``params_m`` counts its nonzero weights and
``flops_nonzero_g`` the multiplications by nonzero weights, what a sparse kernel could at best
skip. Latency is the median of ``repeats`` timed forward passes after warm-up passes, taken under
the machine's timing lock (:func:`exclusive_timing`); ``latency_ms_spread`` (their interquartile
range) and ``latency_ms_min`` / ``_max`` give their spread, which on a machine shared with other
work is wide. At one thread on a CPU, ``latency_cpu_ms`` (the passes' CPU time) says what the
latency is with the core to itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import platform
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

#: untimed forward passes before the timed ones (allocator, caches, lazy kernel selection)
WARMUP = 2


def device_name(device: torch.device | str) -> str:
    """``"cpu: <processor model>"`` or ``"cuda:0: <GPU name>"``: what a latency was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}: {torch.cuda.get_device_name(index)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{device.type}: {model or platform.processor() or platform.machine()}"


@contextlib.contextmanager
def exclusive_timing(device: torch.device | str) -> Iterator[None]:
    """Hold this machine's timing lock for ``device`` (a file lock in its temp folder): trials
    running side by side on one machine time their models one after the other, never while
    another trial times its own (measured: two trials timing at once read up to 3x the latency
    of one alone). The other trials' training goes on meanwhile; ``--max-concurrent 1`` avoids
    that too. Released when the process dies."""
    device = torch.device(device)
    name = f"vpns-timing-{device.type}{device.index if device.index is not None else ''}.lock"
    path = Path(tempfile.gettempdir()) / name  # this machine's own: a shared folder would serialise nodes
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn: Callable[[], Any], device: torch.device | str, repeats: int,
            warmup: int = WARMUP, cpu_times: list[float] | None = None) -> list[float]:
    """Seconds (wall clock) of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls
    (the device synchronised around each timed call); ``cpu_times``, if given, receives the
    calling thread's CPU seconds of each call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start, cpu = time.perf_counter(), time.thread_time()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.thread_time() - cpu)
    return out


def spread(times: list[float]) -> float:
    """Interquartile range of ``times`` (0 for fewer than two): the spread of the timed runs
    beside their median, robust to one pass that a neighbour's work slowed down."""
    if len(times) < 2:
        return 0.0
    low, _, high = statistics.quantiles(times, n=4, method="inclusive")
    return high - low


def latency(model: nn.Module, size: int, batch: int, *, device: torch.device | str = "cpu",
            repeats: int = 5, channels_last: bool = False,
            amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Inference latency of ``model`` on a ``batch × 3 × size × size`` input: ``latency_ms`` (the
    median of ``repeats`` timed passes after :data:`WARMUP`), ``latency_ms_min``,
    ``latency_ms_max``, ``latency_ms_spread`` (the interquartile range, :func:`spread`); at one
    CPU thread ``latency_cpu_ms``, the median CPU time of the passes
    (the latency with the core to itself: other processes on a shared machine do not inflate
    it; caches and memory bandwidth they share still do); and the conditions (``latency_batch``, ``latency_repeats``,
    ``latency_threads``: torch's CPU threads, ``latency_device``, ``latency_layout``: NHWC with
    ``channels_last``, else NCHW; the same network can differ by 1.8x between them) and autocast
    with ``amp_dtype``, as the trial feeds the model. The input
    comes from a private generator: the global random state is untouched."""
    device = torch.device(device)
    model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None \
        else contextlib.nullcontext()
    cpu_times: list[float] = []
    with torch.no_grad(), autocast, exclusive_timing(device):
        times = timings(lambda: model(x), device, repeats, cpu_times=cpu_times)
    out = {"latency_ms": 1e3 * statistics.median(times), "latency_ms_min": 1e3 * min(times),
           "latency_ms_max": 1e3 * max(times), "latency_ms_spread": 1e3 * spread(times), "latency_batch": batch, "latency_repeats": repeats,
           "latency_threads": torch.get_num_threads(), "latency_device": device_name(device),
           "latency_layout": "NHWC" if channels_last else "NCHW"}
    if device.type == "cpu" and torch.get_num_threads() == 1:
        # one thread computes the whole pass in this thread: its CPU time is the latency the pass
        # would have had with the core to itself, whatever else the machine ran meanwhile
        out["latency_cpu_ms"] = 1e3 * statistics.median(cpu_times)
    return out


def _masked_layers(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = sorted(set(masks) - set(modules))
    if missing:
        raise KeyError(f"masks name layers the model lacks: {missing[:5]}")
    return {name: modules[name] for name in masks}


def flops(model: nn.Module, size: int, masks: dict[str, Tensor] | None = None, *,
          device: torch.device | str = "cpu") -> tuple[float, float]:
    """FLOPs per image (``torch.utils.flop_counter``, one ``3 × size × size`` input) on dense
    kernels, and the FLOPs left when every multiplication by a weight that ``masks`` prune is
    skipped (a weight of a conv is used once per output position, of a linear once per row):
    both in GFLOPs."""
    device = torch.device(device)
    model.to(device).eval()
    layers = _masked_layers(model, masks or {})
    positions: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            out_channels = module.weight.shape[0]
            positions[name] = output.numel() // out_channels
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops()
    skipped = sum(2 * int((~masks[name].bool()).sum()) * positions.get(name, 0) for name in layers)
    return total / 1e9, (total - skipped) / 1e9


def nonzero_parameters(model: nn.Module, masks: dict[str, Tensor] | None = None) -> int:
    """Parameters of ``model`` less the weights ``masks`` prune (a mask has its layer's weight
    shape; True = kept)."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(int((~m.bool()).sum()) for m in (masks or {}).values())


def cost_record(model: nn.Module, size: int, *, masks: dict[str, Tensor] | None = None,
                device: torch.device | str = "cpu", batch: int = 64, repeats: int = 5,
                count_flops: bool = True, channels_last: bool = False,
                amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The deployed model's cost: ``params_m`` (millions; nonzeros under ``masks``); with
    ``count_flops``, ``flops_g`` and ``flops_nonzero_g`` (:func:`flops`); when ``repeats`` > 0,
    :func:`latency` at ``batch``. The model is left in eval mode on ``device``."""
    model.to(device).eval()
    out: dict[str, Any] = {"params_m": nonzero_parameters(model, masks) / 1e6}
    if count_flops:
        out["flops_g"], out["flops_nonzero_g"] = flops(model, size, masks, device=device)
    if repeats:
        out.update(latency(model, size, batch, device=device, repeats=repeats,
                           channels_last=channels_last, amp_dtype=amp_dtype))
    return out


def trial_costs(export: dict[str, Any], cfg: "Config", *, device: torch.device | str,
                amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                inputs: Callable[[], Tensor] | None = None) -> dict[str, Any]:
    """A trial's cost record, or ``{}`` without ``cfg.cost_record`` (nothing is built, counted
    or timed). ``export`` is the trial's export dict (:mod:`vpns_core.export`): the model is
    rebuilt from it as a user loads it (:func:`vpns_core.models.plain_model`) and measured with
    :func:`cost_record` on ``device``, with the trial's input layout and autocast, at
    ``cfg.latency_batch`` (``cfg.measure_repeats`` timed passes, ``cfg.count_flops``). A 2:4
    trial adds :func:`semi_structured_record` on ``inputs()`` (real unprompted test images in the
    frame, float)."""
    if not cfg.cost_record:
        return {}
    from .models import plain_model
    out = cost_record(plain_model(export), cfg.output_size, masks=export["masks"], device=device,
                      batch=cfg.latency_batch, repeats=cfg.measure_repeats, count_flops=cfg.count_flops,
                      channels_last=channels_last, amp_dtype=amp_dtype)
    if cfg.nm == (2, 4):
        out.update(semi_structured_record(export, device, inputs))
    return out


def semi_structured_record(export: dict[str, Any], device: torch.device | str,
                           inputs: Callable[[], Tensor] | None) -> dict[str, Any]:
    """A 2:4 export with its eligible linear layers in torch's semi-structured sparse format
    (:mod:`vpns_core.semi_structured`), checked against the dense-with-zeros model on ``inputs()``
    and timed against it, where the device has the kernels; elsewhere the reason
    (``semi_structured_note``: the export keeps dense weights with zeros)."""
    import copy

    from . import semi_structured
    from .models import plain_model
    reason = semi_structured.unavailable(device)
    if reason is not None or inputs is None:
        return {"semi_structured_note": reason or "no input images to check the conversion on"}
    dense = plain_model(export).to(device).half().eval()
    sparse = copy.deepcopy(dense)
    layers = semi_structured.convert(sparse)
    if not layers:
        return {"semi_structured_note": "no linear layer is 2:4 with both sizes multiples of 64"}
    out = semi_structured.compare(dense, sparse, inputs().to(device).half())
    return {"semi_structured_layers": len(layers), "semi_structured_max_abs_diff": out["max_abs_diff"],
            "semi_structured_dense_ms": out["dense_ms"], "semi_structured_sparse_ms": out["sparse_ms"],
            "semi_structured_speedup": out["dense_ms"] / out["sparse_ms"]}


# --- dense versus pruned (channel methods) ----------------------------------------------------


class _PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors alive at once (parameters included), on any device: counts every
    new storage an op creates and drops it when the storage is freed."""

    def __init__(self, base: int = 0) -> None:
        super().__init__()
        self.live = base
        self.peak = base
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _peak_mb(fn: Callable[[], Any], model: nn.Module, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base + _param_bytes(model)) / 2**20
    tracker = _PeakMemory(base=_param_bytes(model))
    with tracker:
        fn()
    return tracker.peak / 2**20


def measure(model: nn.Module, size: int, *, device: torch.device | str = "cpu",
            batches: tuple[int, ...] = (1, 64), repeats: int = 5, train: bool = True,
            count_flops: bool = True, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``params``; with ``count_flops`` FLOPs per image (``flops_g``, :func:`flops`); peak
    inference memory at the largest batch (``memory_mb``) and, with ``train``, of one SGD
    training step there (``train_memory_mb``); when ``repeats`` > 0, the median latency
    (``latency_ms_b{b}``, :func:`timings`) and throughput at each batch size and, with ``train``,
    the training step's time (``train_step_ms``). With ``amp_dtype`` (CUDA: bf16 or fp16) the
    passes run under autocast, as trials do. Call it under :func:`exclusive_timing`."""
    device = torch.device(device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None \
        else contextlib.nullcontext
    was_training = model.training
    model.to(device).eval()
    out: dict[str, float] = {"params": float(sum(p.numel() for p in model.parameters()))}
    if count_flops:
        out["flops_g"] = flops(model, size, device=device)[0]
    big = max(batches)
    with torch.no_grad(), autocast():
        if repeats:
            for b in batches:
                x = torch.randn(b, 3, size, size, device=device)
                t = statistics.median(timings(lambda: model(x), device, repeats))
                out[f"latency_ms_b{b}"] = 1e3 * t
                out[f"throughput_b{b}"] = b / t
        x = torch.randn(big, 3, size, size, device=device)
        out["memory_mb"] = _peak_mb(lambda: model(x), model, device)
    if train:
        model.train()
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        saved = [p.detach().clone() for p in params]
        saved_buffers = [b.detach().clone() for b in model.buffers()]
        opt = torch.optim.SGD(params, lr=0.0)  # lr 0: timing only, weights unchanged
        x = torch.randn(big, 3, size, size, device=device)

        def step():  # any scalar loss: the cost is the backward pass, not the loss
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()

        if repeats:
            out["train_step_ms"] = 1e3 * statistics.median(timings(step, device, repeats))
        out["train_memory_mb"] = _peak_mb(step, model, device)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            for b, s in zip(model.buffers(), saved_buffers):
                b.copy_(s)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    model.train(was_training)
    return out


def compare(dense: nn.Module, pruned: nn.Module, size: int, **kwargs: Any) -> dict[str, float]:
    """:func:`measure` on both models one after the other under the timing lock, as
    ``dense_*`` and ``pruned_*`` (``dense_flops_g`` / ``pruned_flops_g``: never the cost
    record's own ``flops_g``), and the ratios (pruned ÷ dense: ``params_ratio``, ``flops_ratio``,
    ``memory_ratio``, ``train_memory_ratio``; ``speedup`` = dense latency ÷ pruned latency at the
    largest batch, ``speedup_b{smallest}``, ``train_speedup``) where both were measured."""
    with exclusive_timing(kwargs.get("device", "cpu")):  # not while another trial times its model
        d = measure(dense, size, **kwargs)
        p = measure(pruned, size, **kwargs)
    big = max(kwargs.get("batches", (1, 64)))
    small = min(kwargs.get("batches", (1, 64)))
    out = {f"dense_{k}": v for k, v in d.items()}
    out.update({f"pruned_{k}": v for k, v in p.items()})
    out.update({"params_ratio": p["params"] / d["params"], "memory_mb": p["memory_mb"],
                "memory_ratio": p["memory_mb"] / d["memory_mb"]})
    if "flops_g" in p:
        out["flops_ratio"] = p["flops_g"] / d["flops_g"] if d["flops_g"] else float("nan")
    if f"latency_ms_b{big}" in p:
        out["speedup"] = d[f"latency_ms_b{big}"] / p[f"latency_ms_b{big}"]
        out[f"speedup_b{small}"] = d[f"latency_ms_b{small}"] / p[f"latency_ms_b{small}"]
    if "train_step_ms" in p:
        out["train_speedup"] = d["train_step_ms"] / p["train_step_ms"]
    if "train_memory_mb" in p:
        out["train_memory_ratio"] = p["train_memory_mb"] / d["train_memory_mb"]
    return out
