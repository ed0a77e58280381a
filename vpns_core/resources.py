"""What a trial needs on the machine that runs it: its device, its files, its data and weights.

A :class:`~vpns_core.config.Config` checks values only, so a sweep driver can build the configs
of trials that run elsewhere. :func:`check_resources` checks the rest, fast and without compute
or network: :class:`~vpns_core.train.Trial` and the CLI call it before loading anything, and a
sweep's preflight calls it on its driver (``device=False``, ``download`` as the sweep will).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError
from .files import check_file_path

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config


def check_resources(*configs: "Config", download: bool | None = None, device: bool = True) -> None:
    """Raise, with the fix, unless every config's trial can start here.

    Args:
        configs: one or more trial configs; shared datasets, models and files are checked once.
        download: whether missing data and weights may be fetched when the trial builds them;
            None uses each config's ``download`` (a sweep driver that prepares them passes its own).
        device: check that ``cfg.device`` exists on this machine; False on a driver whose trials
            run on other machines.

    Raises:
        ConfigError: ``device`` is ``cuda`` without CUDA here, or ``mask_file`` /
            ``source_checkpoint`` names no file (the message starts with the field).
        DataUnavailableError, WeightsUnavailableError: data or weights missing and not fetchable.
        CheckpointError: ``mask_file`` / ``source_checkpoint`` unreadable by ``torch.load(weights_only=True)``.
    """
    from .checkpoint import check_readable
    from .data import check_available
    from .models import check_model

    if device and any(cfg.device == "cuda" for cfg in configs):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("device: CUDA is not available on this machine; use 'auto' or 'cpu' "
                              "(got 'cuda')")
    files = sorted({(name, getattr(cfg, name)) for cfg in configs
                    for name in ("mask_file", "source_checkpoint") if getattr(cfg, name) is not None})
    for name, path in files:
        check_file_path(name, path)
    fetch = {id(cfg): cfg.download if download is None else download for cfg in configs}
    for dataset, root, allowed in sorted({(c.dataset, c.data_root, fetch[id(c)]) for c in configs}, key=str):
        check_available(dataset, root, allowed)
    for model, pretrained, checkpoint, allowed in sorted(
            {(c.model, c.pretrained and c.source_checkpoint is None, c.source_checkpoint, fetch[id(c)])
             for c in configs}, key=str):
        check_model(model, pretrained, checkpoint, allow_download=allowed)
    for name, path in files:  # corrupt files or pickled objects: refused here, before any compute
        check_readable(path, name)
