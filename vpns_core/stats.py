"""The two rules every summary of trials shares: which trial a point keeps, and mean ± std.

The sweep's console table, the Parquet and MLflow readers of ``analysis`` and the figures all go
through these, so that one sweep gives one answer whichever way it is read.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def selection_key(val_acc: Any, epoch: Any, trial_id: Any) -> tuple:
    """Sort key that puts the trial to keep first: the highest validation accuracy (never the
    test set); on a tie the later selected epoch (the longer-trained model); then the smallest
    trial id, so that the choice does not depend on the order in which trials were read."""
    val = float(val_acc) if _number(val_acc) else -math.inf
    ep = float(epoch) if _number(epoch) else -math.inf
    return (-val, -ep, str(trial_id))


def pick(rows: Sequence[Any], val_acc, epoch, trial_id) -> Any:
    """The row of ``rows`` to keep under :func:`selection_key`; ``val_acc``, ``epoch`` and
    ``trial_id`` read a row's fields (functions of one row). None when ``rows`` is empty."""
    return min(rows, key=lambda r: selection_key(val_acc(r), epoch(r), trial_id(r)), default=None)


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation and count. The std is NaN below two values: one seed
    does not measure seed noise, so it must not read as zero noise. The mean is NaN for none."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def _number(value: Any) -> bool:
    try:
        return value is not None and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False
