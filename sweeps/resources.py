"""Datasets and pretrained weights of a sweep's trials: checked without writing anything (the dry
run), or prepared once in the driver (and by ``python -m sweeps.prepare`` on every node of a
cluster), so that trials only read them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def datasets_of(configs: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """The ``(dataset, data_root)`` pairs ``configs`` read, each once, in a fixed order."""
    return sorted({(c.get("dataset", "fashion_mnist"), c.get("data_root")) for c in configs}, key=str)


def models_of(configs: list[dict[str, Any]]) -> list[tuple[str, bool, str | None]]:
    """The ``(model, pretrained, source_checkpoint)`` triples ``configs`` build, each once."""
    return sorted({(c.get("model", "efficientnet_lite0"), c.get("pretrained", True),
                    c.get("source_checkpoint")) for c in configs}, key=str)


def check_resources(configs: list[dict[str, Any]], download: bool = False) -> None:
    """What the trials of ``configs`` read (datasets, weights, mask and checkpoint files) is on
    disk, or (``download``) can be fetched: the trial's own check
    (:func:`vpns_core.resources.check_resources`), run in the driver before Ray starts, without
    writing or downloading anything. The device is checked where each trial runs."""
    from search_spaces.points import driver_config
    from vpns_core.resources import check_resources as check_trial_resources
    check_trial_resources(*(driver_config(c) for c in configs), download=download, device=False)


def prepare_resources(configs: list[dict[str, Any]], download: bool = True,
                      keep_going: bool = False) -> tuple[list[str], list[str]]:
    """Datasets and pretrained weights, once, in the driver, before any trial starts.

    Trials then only read them (``download=False``) from ``data_root`` and ``TORCH_HOME``, which
    must be paths every worker sees (shared storage, or prepared on every node by the cluster's
    setup commands: ``python -m sweeps.prepare``). Raises with the fix when something is
    missing; with ``keep_going``, notes it and goes on instead. Returns what is ready and what
    is missing (with the reason), as ``"dataset NAME"`` / ``"model NAME"`` lines.
    """
    steps: list[tuple[str, Callable[[], None]]] = []
    for name, root in datasets_of(configs):
        steps.append((f"dataset {name}", lambda name=name, root=root: prepare_dataset(name, root, download)))
    for model in models_of(configs):
        steps.append((f"model {model[0]}", lambda model=model: prepare_model(*model, download=download)))
    ready, missing = [], []
    for what, step in steps:
        try:
            step()
        except (FileNotFoundError, OSError, RuntimeError) as err:
            if not keep_going:
                raise
            missing.append(f"{what}: {err}")
            continue
        ready.append(what)
    return ready, missing


def prepare_dataset(name: str, root: str | None, download: bool = True) -> None:
    from vpns_core.data import DATASETS, check_available
    try:
        check_available(name, root, download=False)
    except FileNotFoundError:
        spec = DATASETS.get(name, "dataset")
        if not (download and spec.downloadable and root):
            raise
        for train in (True, False):
            spec.load(Path(root), train, True)
        check_available(name, root, download=False)


def prepare_model(name: str, pretrained: bool, checkpoint: str | None, download: bool = True) -> None:
    from vpns_core.models import build_model, check_model
    try:
        check_model(name, pretrained and checkpoint is None, checkpoint, allow_download=False)
    except FileNotFoundError:
        if not download:
            raise
        build_model(name, pretrained=pretrained, source_checkpoint=checkpoint)  # downloads
