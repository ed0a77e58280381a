"""Load a channel-pruned model exported by vpns (``model_export.pt``) with plain torch code.

No vpns import: the export holds the architecture's builder (``import module; call(*args,
**kwargs)``, e.g. ``torchvision.models.get_model('resnet18', weights=None, num_classes=1000)``),
the new channel counts of every resized Conv/Linear/BatchNorm (``architecture``) and a normal
``state_dict``. The builder's model is resized in place (channel attributes set, parameters and
buffers replaced by tensors of the saved shapes) and then loaded strictly.

    python scripts/load_pruned.py results/.../model_export.pt     # prints the model's size

or, in Python, copy :func:`load_pruned`.
"""
from __future__ import annotations

import importlib
import sys

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
    for name, attrs in export["architecture"].items():
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


if __name__ == "__main__":
    net = load_pruned(sys.argv[1])
    print(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters())} parameters")
