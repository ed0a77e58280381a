"""2:4 masks as real speed on a GPU: linear layers converted to torch's semi-structured sparse
format (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt / CUTLASS kernels on NVIDIA GPUs of
compute capability 8.0 and later, fp16 or bf16).

:func:`unavailable` says why a device cannot (a CPU: torch has no semi-structured kernels there,
so the export keeps dense weights with zeros). :func:`convert` swaps every eligible ``nn.Linear``
(a 2:4 mask, both dimensions multiples of 64 as the kernels require) in place and returns their
names; :func:`compare` checks the converted model against the dense-with-zeros one on real
inputs and times both.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from .masking import nm_mask


def unavailable(device: torch.device | str) -> str | None:
    """None when ``device`` runs semi-structured sparse matmuls, else the reason."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "cuda: no CUDA device is visible to this process"
    if device.type != "cuda":
        return (f"{device.type}: torch's semi-structured sparse kernels run on NVIDIA GPUs of compute "
                f"capability 8.0+ only; the export keeps dense weights with zeros")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"cuda: compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores"
    return None


def is_2_4(weight: Tensor) -> bool:
    """Whether ``weight`` [out, in] has at most two nonzeros in every group of four along ``in``."""
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and bool((groups <= 2).all())


def eligible(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % 64 == 0
            and module.out_features % 64 == 0 and is_2_4(module.weight.detach()))


@torch.no_grad()
def convert(model: nn.Module) -> list[str]:
    """Swap the weight of every eligible ``nn.Linear`` of ``model`` (on a capable GPU, in fp16 or
    bf16) for its semi-structured sparse form, in place; returns the converted layers' names."""
    from torch.sparse import to_sparse_semi_structured
    done = []
    for name, module in model.named_modules():
        if eligible(module):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                         requires_grad=False)
            done.append(name)
    return done


@torch.no_grad()
def prune_2_4(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Keep the two largest-magnitude weights of every four in each linear layer (not ``skip``):
    what the GPU check converts when it times a model without a trained mask. Returns how many
    layers it pruned."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in skip and module.in_features % 4 == 0:
            module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
            count += 1
    return count


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.no_grad()
def compare(dense: nn.Module, sparse: nn.Module, inputs: Tensor, repeats: int = 20) -> dict[str, Any]:
    """``sparse`` (converted) against ``dense`` (the same weights with zeros) on ``inputs``: the
    largest absolute difference of the outputs and the median latency of each (ms)."""
    device = inputs.device
    want, got = dense(inputs), sparse(inputs)
    return {"max_abs_diff": float((got.float() - want.float()).abs().max()),
            "dense_ms": _median_ms(lambda: dense(inputs), repeats, device),
            "sparse_ms": _median_ms(lambda: sparse(inputs), repeats, device)}
