"""The one statistical rule of every caption, table and README claim (vpns_core.stats.paired),
checked against scipy and against Holm's procedure computed by hand."""
import math

import pytest
from scipy import stats as sps

from vpns_core.stats import Comparison, paired

# illustrative per-seed accuracies of two arms at seeds 7, 9, 17 (the frozen one: the README's exploratory frozen pad)
PAD8 = {7: 83.5, 9: 85.2, 17: 81.8}
FROZEN = {7: 77.3, 9: 84.2, 17: 77.1}


def test_one_comparison_is_scipys_paired_t_test():
    (c,) = paired({"pad 8": PAD8, "frozen": FROZEN}, [("pad 8", "frozen")])
    a, b = [PAD8[s] for s in (7, 9, 17)], [FROZEN[s] for s in (7, 9, 17)]
    ref = sps.ttest_rel(a, b)
    low, high = ref.confidence_interval(0.95)
    assert c.n == 3 and c.family == 1 and c.seeds == (7, 9, 17)
    assert c.diff == pytest.approx(sum(x - y for x, y in zip(a, b)) / 3)
    assert (c.low, c.high) == (pytest.approx(low), pytest.approx(high))
    assert c.p == pytest.approx(ref.pvalue) and c.p_holm == pytest.approx(ref.pvalue)
    assert c.confidence == pytest.approx(0.95)
    assert c.verdict == "not resolved" and c.low < 0 < c.high
    assert c.text().startswith("pad 8 − frozen: +4.0 points, 95% CI [")
    assert c.text().endswith("3 seeds: not resolved")


def _arm(diffs, base=50.0):
    return {s: base + d for s, d in enumerate(diffs)}, {s: base for s in range(len(diffs))}


def test_holm_step_down_by_hand():
    # three arms against one control: p-values 0.0010, 0.0184, 0.0393 (two-sided, 5 seeds)
    arms = {"ctl": {s: 50.0 for s in range(5)},
            "big": {s: 50.0 + d for s, d in enumerate([5.0, 5.5, 6.0, 4.5, 5.2])},
            "mid": {s: 50.0 + d for s, d in enumerate([2.0, 0.5, 3.0, 1.0, 2.5])},
            "small": {s: 50.0 + d for s, d in enumerate([1.0, -0.2, 2.0, 0.1, 1.5])}}
    pairs = [("small", "ctl"), ("big", "ctl"), ("mid", "ctl")]
    out = {c.arm: c for c in paired(arms, pairs)}
    p = {k: sps.ttest_1samp([arms[k][s] - 50.0 for s in range(5)], 0).pvalue for k in ("big", "mid", "small")}
    assert p["big"] < p["mid"] < p["small"]
    # Holm: sorted p_(1) <= p_(2) <= p_(3), adjusted = running max of (m - i + 1) p_(i)
    holm_big = 3 * p["big"]
    holm_mid = max(holm_big, 2 * p["mid"])
    holm_small = max(holm_mid, 1 * p["small"])
    assert out["big"].p_holm == pytest.approx(holm_big)
    assert out["mid"].p_holm == pytest.approx(holm_mid)
    assert out["small"].p_holm == pytest.approx(holm_small)
    # step levels 0.05/3, 0.05/2, 0.05/1 while rejecting
    for k, level in (("big", 0.05 / 3), ("mid", 0.05 / 2)):
        assert out[k].confidence == pytest.approx(1 - level)
        d = [arms[k][s] - 50.0 for s in range(5)]
        low, _ = sps.ttest_1samp(d, 0).confidence_interval(1 - level)
        assert out[k].low == pytest.approx(low)
    # resolved exactly when the corrected interval excludes zero
    for c in out.values():
        assert (c.verdict == "resolved") == (c.low > 0 or c.high < 0) == (c.p_holm < 0.05)
    assert [c.arm for c in paired(arms, pairs)] == ["small", "big", "mid"]  # the order asked


def test_after_holm_stops_later_pairs_keep_the_failed_steps_level():
    arms = {"ctl": {s: 0.0 for s in range(4)},
            "a": {0: 1.0, 1: -1.0, 2: 2.0, 3: -0.5},   # p ~ 0.6
            "b": {0: 1.0, 1: 1.2, 2: 0.2, 3: 1.4}}     # p ~ 0.02: rejects alone, not at 0.05/2
    out = {c.arm: c for c in paired(arms, [("a", "ctl"), ("b", "ctl")])}
    pb = sps.ttest_1samp([1.0, 1.2, 0.2, 1.4], 0).pvalue
    assert 0.025 < pb < 0.05
    assert out["b"].verdict == "not resolved" and out["b"].low < 0
    assert out["a"].confidence == pytest.approx(out["b"].confidence) == pytest.approx(1 - 0.025)
    assert out["a"].verdict == "not resolved"


def test_pairs_only_seeds_both_finished_and_says_not_tested_below_three():
    arms = {"x": {1: 80.0, 2: 81.0, 3: math.nan, 4: 79.0}, "y": {1: 70.0, 2: 72.0, 4: 71.0, 5: 60.0}}
    (c,) = paired(arms, [("x", "y")])
    assert c.seeds == (1, 2, 4) and c.n == 3  # seed 3 failed (NaN), seed 5 only in y
    (few,) = paired({"x": {1: 80.0, 2: 81.0}, "y": {1: 70.0, 2: 72.0}}, [("x", "y")])
    assert few.verdict == "not tested" and math.isnan(few.p_holm)
    assert few.text() == "x − y: +9.5 points (2 seeds paired; at least 3 needed): not tested"
    (one,) = paired({"x": {1: 80.0}, "y": {1: 70.0}}, [("x", "y")])
    assert "1 seed paired" in one.text() and "nan" not in one.text()
    # untested pairs stay out of the family: the tested one is not corrected for them
    both = paired({**arms, "z": {1: 1.0}}, [("x", "y"), ("z", "y")])
    assert both[0].family == 1 and both[1].verdict == "not tested"


def test_comparison_is_a_value():
    c = Comparison("a", "b", 3, 1.0, 0.5, 1.5, 0.01, 0.01, 0.95, 1)
    assert c.verdict == "resolved"
    assert Comparison("a", "b", 3, -1.0, -1.5, -0.5, 0.01, 0.03, 0.95, 2).verdict == "resolved"


def test_the_exploratory_investigation_retested_with_the_one_rule():
    """The README's exploratory numbers (docs/data/exploratory_seeds.csv): the learned pad against
    the frozen one alone is +4.0 points, 95% CI [-4.0, 11.9] (the MISSION's figure); over the
    investigation's 15 comparisons no difference survives Holm's correction at 3 seeds."""
    from analysis import exploratory
    values = exploratory.load()
    (alone,) = paired(values, [exploratory.COMPARISONS[6][1:]])
    assert alone.diff == pytest.approx(4.0, abs=0.05)
    assert (round(alone.low, 1), round(alone.high, 1)) == (-4.0, 11.9)
    family = exploratory.results()
    assert len(family) == 15 and all(c.family == 15 for _, c in family)
    assert all(c.verdict == "not resolved" for _, c in family)
    assert "| the default: VPNs − HYDRA with as many updates | +7.1 |" in exploratory.table()
