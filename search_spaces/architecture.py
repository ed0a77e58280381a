"""Architectures compared in the paper: ImageNet ResNet-18, ResNet-50 and VGG-16."""
from __future__ import annotations

from search_spaces import base as _base, pick


def base(preset: str) -> dict:
    return _base.base(preset)


def space(preset: str) -> dict:
    # default: the one ImageNet model that ships offline, and a torchvision ResNet-18 trained
    # from scratch as the "no pretraining" contrast (torchvision weights need TORCH_HOME).
    models = pick(preset, paper={"resnet18": {"model": "resnet18"},
                                 "resnet50": {"model": "resnet50"},
                                 "vgg16": {"model": "vgg16"}},
                  default={"efficientnet_lite0": {"model": "efficientnet_lite0"},
                           "resnet18_scratch": {"model": "resnet18", "pretrained": False}},
                  tiny={"tiny_resnet": {"model": "tiny_resnet"},
                        "resnet18_scratch": {"model": "resnet18", "pretrained": False}})
    return {"architecture": models, "method": ["vpns", "hydra"]}
