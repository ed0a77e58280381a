"""Transfer: masks found on a source task, then weights (and prompt) tuned on target tasks.

Phase ``source`` finds masks (stage 1 only: ``tune_epochs=0``) on each source dataset; phase
``target`` fine-tunes each found mask on each target dataset (``mask_file``: stage 1 skipped),
with the source trial's method and seed.
"""
from __future__ import annotations

from search_spaces import base as _base, pick


def base(preset: str) -> dict:
    return _base.base(preset)


def source_space(preset: str) -> dict:
    datasets = pick(preset, paper=["cifar100"], default=["fashion_mnist"], tiny=["fashion_mnist"])
    return {"dataset": datasets, "method": ["vpns", "hydra"]}


def target_datasets(preset: str) -> list[str]:
    return pick(preset, paper=["cifar10", "dtd", "flowers102", "oxford_pets", "stanford_cars"],
                default=["digits"], tiny=["digits"])


def space(preset: str) -> dict:
    return source_space(preset)
