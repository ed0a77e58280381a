"""What a deployed model costs: parameters (nonzeros under weight masks), FLOPs and measured
latency, with the device and thread count the latency was measured on.

Every trial ends with this record (:meth:`vpns_core.train.Trial.finish`), measured on the model
it exports: the smaller network of a channel method, the dense-shaped network with the masks
applied for a weight method, the network itself for dense fine-tuning. Unstructured sparsity
saves nothing on dense kernels, so a weight-masked model's latency and ``flops_g`` are the dense
model's; ``params_m`` counts its nonzero weights and ``flops_nonzero_g`` the multiplications by
nonzero weights, what a sparse kernel could at best skip. Latency is the median of
``repeats`` timed forward passes after warm-up passes, taken under the machine's timing lock
(:func:`exclusive_timing`); ``latency_ms_min`` / ``_max`` give their spread, which on a machine
shared with other work is wide. At one thread on a CPU, ``latency_cpu_ms`` (the passes' CPU
time) says what the latency is with the core to itself.
"""
from __future__ import annotations

import contextlib
import fcntl
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

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


def latency(model: nn.Module, size: int, batch: int, *, device: torch.device | str = "cpu",
            repeats: int = 5, channels_last: bool = False,
            amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Inference latency of ``model`` on a ``batch × 3 × size × size`` input: ``latency_ms`` (the
    median of ``repeats`` timed passes after :data:`WARMUP`), ``latency_ms_min``,
    ``latency_ms_max``; at one CPU thread ``latency_cpu_ms``, the median CPU time of the passes
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
           "latency_ms_max": 1e3 * max(times), "latency_batch": batch, "latency_repeats": repeats,
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
                channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The deployed model's cost: ``params_m`` (millions; nonzeros under ``masks``), ``flops_g``
    and ``flops_nonzero_g`` (:func:`flops`) and, when ``repeats`` > 0, :func:`latency` at
    ``batch``. The model is left in eval mode on ``device``."""
    dense_flops, nonzero_flops = flops(model, size, masks, device=device)
    out: dict[str, Any] = {"params_m": nonzero_parameters(model, masks) / 1e6,
                           "flops_g": dense_flops, "flops_nonzero_g": nonzero_flops}
    if repeats:
        out.update(latency(model, size, batch, device=device, repeats=repeats,
                           channels_last=channels_last, amp_dtype=amp_dtype))
    return out
