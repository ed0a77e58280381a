"""The rules every summary of trials shares: which trial a point keeps, mean ± std, and the one
test of a difference (:func:`paired`: paired by seed, t-interval, Holm over a figure's family).

The sweep's console table, the Parquet and MLflow readers of ``analysis``, the figures' captions,
the HTML report and the README's tables all go through these, so that one sweep gives one answer
whichever way it is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


# --- paired comparisons --------------------------------------------------------------------------

#: the family-wise error rate of one figure's comparisons (95% intervals after correction)
ALPHA = 0.05
MIN_SEEDS = 3  # below this a paired t-interval says nothing useful: "not tested"


@dataclass(frozen=True)
class Comparison:
    """An arm against its control, paired by seed: ``diff`` is the mean over the seeds both
    finished of (arm − control), ``low``/``high`` its t-interval at the Holm step's level
    (``confidence``), ``p`` the two-sided paired t-test's p-value and ``p_holm`` that p-value
    Holm-adjusted over the family. ``verdict``: ``"resolved"`` (the corrected interval excludes
    zero, equivalently ``p_holm`` < ``ALPHA``), ``"not resolved"`` (it contains zero: the data
    cannot tell, which is not "no difference"), or ``"not tested"`` (fewer than ``MIN_SEEDS``
    paired seeds)."""

    arm: str
    control: str
    n: int
    diff: float
    low: float
    high: float
    p: float
    p_holm: float
    confidence: float
    family: int
    seeds: tuple = ()

    @property
    def verdict(self) -> str:
        if self.n < MIN_SEEDS or math.isnan(self.p):
            return "not tested"
        return "resolved" if self.p_holm < ALPHA else "not resolved"

    def text(self, unit: str = " points", verdict: str | None = None) -> str:
        """"pad 8 − frozen pad: +4.0 points, family-wise 95% CI [−4.0, +11.9] (Holm over 4),
        p = 0.17 (Holm), 3 seeds: not resolved"; ``verdict`` replaces the last words (e.g. the
        confirmation's "reproduced")."""
        head = f"{self.arm} − {self.control}"
        if self.n < MIN_SEEDS:
            seeds = "1 seed" if self.n == 1 else f"{self.n} seeds"
            shown = f": {self.diff:+.1f}{unit}" if self.n else ""
            return f"{head}{shown} ({seeds} paired; at least {MIN_SEEDS} needed): not tested"
        if math.isnan(self.p):  # every seed gave the same difference: no variance to test
            return f"{head}: {self.diff:+.1f}{unit} at all {self.n} seeds (no variance): not tested"
        level = f"family-wise 95% CI (Holm over {self.family})" if self.family > 1 else "95% CI"
        return (f"{head}: {self.diff:+.1f}{unit}, {level} [{self.low:+.1f}, {self.high:+.1f}], "
                f"p = {self.p_holm:.2g}{' (Holm)' if self.family > 1 else ''}, "
                f"{self.n} seeds: {verdict or self.verdict}")


def paired(values: dict[str, dict[Any, float]], pairs: Sequence[tuple[str, str]],
           alpha: float = ALPHA) -> list[Comparison]:
    """Each ``(arm, control)`` of ``pairs`` compared on ``values[label][seed]``, paired by seed
    (only seeds both finished count; NaNs are dropped), as one family.

    Per pair: the mean difference, the two-sided paired t-test (``scipy.stats.ttest_rel``) and
    its t-interval. Holm's step-down over the family's tested pairs: sorted by p, step i of m
    tests at level ``alpha / (m − i + 1)`` until one fails; every later pair keeps the level of
    the step that failed. Each interval is drawn at its step's level, so "resolved" (the
    corrected interval excludes zero) holds exactly when Holm rejects (``p_holm`` < ``alpha``).
    Pairs with fewer than ``MIN_SEEDS`` paired seeds are reported, untested, outside the family.
    Returned in the order of ``pairs``.
    """
    from scipy import stats as sps

    raw = []
    for arm, control in pairs:
        a, b = values.get(arm, {}), values.get(control, {})
        seeds = _sorted([s for s in a if s in b and _number(a[s]) and _number(b[s])])
        d = [float(a[s]) - float(b[s]) for s in seeds]
        n = len(d)
        mean = sum(d) / n if n else math.nan
        if n >= MIN_SEEDS:
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
            p = float(sps.ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds]).pvalue) if sd > 0 else math.nan
        else:
            sd, p = math.nan, math.nan
        raw.append((arm, control, seeds, n, mean, sd, p))
    tested = sorted((i for i, r in enumerate(raw) if r[3] >= MIN_SEEDS and not math.isnan(r[6])),
                    key=lambda i: raw[i][6])
    m = len(tested)
    level, adjusted, running, failed = {}, {}, 0.0, False
    for step, i in enumerate(tested):
        if not failed:
            current = alpha / (m - step)
            failed = raw[i][6] >= current
        level[i] = current
        running = max(running, min(1.0, (m - step) * raw[i][6]))
        adjusted[i] = running
    out = []
    for i, (arm, control, seeds, n, mean, sd, p) in enumerate(raw):
        if i in level:
            half = float(sps.t.ppf(1 - level[i] / 2, n - 1)) * sd / math.sqrt(n)
            low, high, conf, p_holm = mean - half, mean + half, 1 - level[i], adjusted[i]
        else:
            low = high = p_holm = conf = math.nan
        out.append(Comparison(arm, control, n, mean, low, high, p, p_holm, conf, m, tuple(seeds)))
    return out


def _sorted(seeds: list) -> list:
    try:
        return sorted(seeds)
    except TypeError:  # mixed kinds of labels
        return sorted(seeds, key=str)
