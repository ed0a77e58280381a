"""Load a model exported by vpns (``model_export.pt``) with plain torch code, and time it.

No vpns import: the export holds the architecture's builder (``import module; call(*args,
**kwargs)``, e.g. ``torchvision.models.get_model('resnet18', weights=None, num_classes=1000)``),
the channel counts of every Conv/Linear/BatchNorm (``architecture``; smaller after channel
pruning) and a normal ``state_dict`` (weight masks already applied). The builder's model is
resized in place (channel attributes set, parameters and buffers replaced by tensors of the
saved shapes) and then loaded strictly. Weight-masked models load into the dense architecture
(their pruned weights are zeros).

    python scripts/load_pruned.py results/.../model_export.pt            # prints the model's size
    python scripts/load_pruned.py EXPORT --latency-batch 64 --threads 1 --channels-last  # and its latency here

or, in Python, copy :func:`load_pruned`. The latency is the median of ``--repeats`` timed
forward passes after two warm-up passes, on the export's input size (``output_size``); the spread
(min / max) says how much the machine disturbed it.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from torch import nn


def load_pruned(path: str) -> nn.Module:
    export = torch.load(path, map_location="cpu", weights_only=True)
    spec = export["builder"]
    target = importlib.import_module(spec["module"])
    for attr in spec["call"].split("."):
        target = getattr(target, attr)
    model = target(*spec["args"], **spec["kwargs"])
    state = export["state_dict"]
    modules = dict(model.named_modules())
    for name, attrs in export.get("architecture", {}).items():
        module = modules[name]
        for attr, value in attrs.items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for key in list(module._parameters):
            if module._parameters[key] is not None and prefix + key in state:
                module._parameters[key] = nn.Parameter(torch.empty_like(state[prefix + key]))
        for key in list(module._buffers):
            if module._buffers[key] is not None and prefix + key in state:
                module._buffers[key] = torch.empty_like(state[prefix + key])
    model.load_state_dict(state, strict=True)
    return model.eval()


def time_model(model: nn.Module, size: int, batch: int, repeats: int = 20,
               channels_last: bool = False) -> list[float]:
    """Milliseconds of ``repeats`` timed forward passes (after 2 warm-up passes) on the CPU, on
    NCHW input or, with ``channels_last``, NHWC input (what vpns trials feed networks with
    depthwise convolutions on a CPU; often much faster there)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for i in range(2 + repeats):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - start))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a model_export.pt")
    parser.add_argument("--latency-batch", type=int, default=None, help="also time the model at this batch size")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true",
                        help="time on NHWC input (the trial's layout when it recorded latency_layout NHWC)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = load_pruned(args.export)
    print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters())} parameters, "
          f"{sum(int((p != 0).sum()) for p in net.parameters())} nonzero")
    if args.latency_batch:
        size = torch.load(args.export, map_location="cpu", weights_only=True)["output_size"]
        times = time_model(net, size, args.latency_batch, args.repeats, args.channels_last)
        layout = "NHWC" if args.channels_last else "NCHW"
        print(f"latency at batch {args.latency_batch}, {size} px, {layout} input, {torch.get_num_threads()} CPU threads: "
              f"median {statistics.median(times):.2f} ms (min {min(times):.2f}, max {max(times):.2f}, "
              f"{args.repeats} timed passes)")


if __name__ == "__main__":
    main()
