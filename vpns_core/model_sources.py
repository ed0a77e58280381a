"""Models named by where they come from, beside the registered and torchvision names:

- ``timm/<name>``: a timm model (optional extra: ``pip install timm``). Weights only from disk: a
  ``--source-checkpoint`` file, or ``pretrained=True`` from the Hugging Face / timm cache already
  on this machine (``HF_HUB_OFFLINE`` is forced unless ``download=True``), never fetched unasked.
- ``package.module:factory``: the user's own code, imported by path; ``factory()`` returns an
  ``nn.Module`` (ImageNet normalisation assumed) or a :class:`vpns_core.models.SourceModel`;
  its weights come from the factory or ``--source-checkpoint``.

The classifier is found, not guessed silently: timm's ``get_classifier()``, else the last
``nn.Linear`` (:func:`vpns_core.models.head_layer`); a model without one is refused by name.
"""
from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

TIMM_PREFIX = "timm/"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def kind(name: str) -> str | None:
    """``"timm"``, ``"import"`` or None (a registered or torchvision name)."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    if _IMPORT_PATH.match(name):
        return "import"
    return None


def _timm() -> Any:
    try:
        import timm
    except ImportError as err:
        raise ValueError("model: timm models need the optional extra: pip install timm "
                         "(or pip install -e '.[test]')") from err
    return timm


def check(name: str, pretrained: bool, has_checkpoint: bool) -> None:
    """Raise ``ValueError`` (field ``model``) naming what is wrong, without building anything:
    an unknown timm name, timm missing, an import path that does not import or names no
    callable, or timm pretrained weights absent from the local cache."""
    if kind(name) == "timm":
        timm = _timm()
        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:6]}*")[:3]
            hint = f" (did you mean {', '.join('timm/' + c for c in close)}?)" if close else ""
            raise ValueError(f"model: unknown timm model '{arch}'{hint}")
        if pretrained and not has_checkpoint and not _timm_cached(arch):
            raise ValueError(
                f"model: no pretrained weights for 'timm/{arch}' on this machine (not in the "
                f"Hugging Face cache {_hf_cache()}; vpns never downloads them unasked): give "
                f"--source-checkpoint PATH, run with --no-pretrained, or allow a download with "
                f"--download")
    elif kind(name) == "import":
        _factory(name)


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return HF_HUB_CACHE


def _timm_cached(arch: str) -> bool:
    """Whether timm's pretrained file for ``arch`` is in the local Hugging Face cache."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache
    repo = hub_id.split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


@contextmanager
def _offline(allow_download: bool):
    """Hugging Face hub offline while building, unless a download was asked for."""
    if allow_download:
        yield
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _factory(name: str):
    module_name, _, attr = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module: say why it did not import
        raise ValueError(f"model: cannot import '{module_name}' for '{name}': "
                         f"{type(err).__name__}: {err}") from err
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model: '{module_name}' has no '{attr}' (from '{name}')")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model: '{name}' is not callable; name a function returning an nn.Module")
    return target


def build(name: str, pretrained: bool, allow_download: bool = False, num_classes: int | None = None):
    """A :class:`vpns_core.models.SourceModel` for a timm or import-path ``name``.
    ``num_classes`` (a checkpoint's head) builds the head at that size."""
    if kind(name) == "timm":
        timm = _timm()
        arch = name[len(TIMM_PREFIX):]
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        with _offline(allow_download):
            try:
                module = timm.create_model(arch, pretrained=pretrained, **kwargs)
            except Exception as err:  # noqa: BLE001 - offline cache miss, corrupt file, ...
                raise ValueError(f"model: cannot build 'timm/{arch}' (pretrained={pretrained}): "
                                 f"{type(err).__name__}: {err}") from err
        cfg = getattr(module, "pretrained_cfg", {}) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        return SourceModel(module, mean, std, int(module.num_classes), name)
    made = _factory(name)()
    if isinstance(made, SourceModel):
        return made
    if not isinstance(made, nn.Module):
        raise ValueError(f"model: '{name}' returned {type(made).__name__}, not an nn.Module")
    try:
        classes = head_layer(made)[1].out_features
    except ValueError as err:
        raise ValueError(f"model: '{name}' has no nn.Linear classifier head, which vpns maps to "
                         f"the target classes; end the network in an nn.Linear") from err
    return SourceModel(made, IMAGENET_MEAN, IMAGENET_STD, int(classes), name)


def classifier_name(model: nn.Module) -> str | None:
    """The qualified name of timm's ``get_classifier()`` module, when the model has one that is
    an ``nn.Linear``; None otherwise (the last Linear is used then)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    if not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def builder(name: str, num_classes: int) -> dict[str, Any]:
    """How to rebuild the architecture without vpns (see :func:`vpns_core.models.builder_spec`)."""
    if kind(name) == "timm":
        return {"module": "timm", "call": "create_model", "args": [name[len(TIMM_PREFIX):]],
                "kwargs": {"pretrained": False, "num_classes": num_classes}}
    module_name, _, attr = name.partition(":")
    return {"module": module_name, "call": attr, "args": [], "kwargs": {}}


@dataclass
class SourceModel:
    """A source classifier and the normalisation its inputs need."""

    module: nn.Module                     # returns logits [B, num_source_classes]
    mean: tuple[float, float, float]      # per-channel, for inputs in [0, 1]
    std: tuple[float, float, float]
    num_source_classes: int               # 1000 for ImageNet models
    name: str


def head_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """Qualified name and module of the final classifier ``nn.Linear``.

    timm's ``get_classifier()`` where the model has one; otherwise the last Linear in
    registration order: torchvision models (all 80 checked in the tests), EfficientNet-Lite and
    TinyResNet register layers in the order forward() runs them. Raises ``ValueError`` for a model
    without a Linear head (squeezenet ends in a Conv2d).
    """
    named = classifier_name(model)
    if named is not None:
        return named, model.get_submodule(named)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linears[-1]
