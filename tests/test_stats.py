"""devices/stats.py: every statistic from raw samples, checked against numpy/known values."""

import numpy as np
import pytest

from hilq.stats import FIELDS, MIN_SAMPLES, Stats, summarize


def test_fields_are_all_derived_and_named():
    d = summarize(np.arange(1, 101, dtype=float))
    assert tuple(d) == FIELDS
    assert d["n"] == 100 and d["min"] == 1 and d["max"] == 100
    assert d["mean"] == pytest.approx(50.5)
    assert d["p50"] == pytest.approx(np.percentile(np.arange(1, 101), 50))
    assert d["p90"] == pytest.approx(90.1) and d["p99"] == pytest.approx(99.01)
    assert d["iqr"] == pytest.approx(d["q3"] - d["q1"])
    assert d["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))


def test_tukey_outliers():
    s = Stats([10.0] * 50 + [10.5] * 50 + [100.0, 200.0, 0.1])
    assert s.outliers_high == 2 and s.outliers_low == 1


def test_bootstrap_ci_is_seeded_and_brackets_the_median():
    x = np.random.default_rng(3).lognormal(0, 0.2, 500)
    a, b = Stats(x, seed=1).ci95_p50, Stats(x, seed=1).ci95_p50
    assert a == b
    assert a[0] <= np.median(x) <= a[1] and a[1] - a[0] < 0.1
    assert Stats(x, seed=2).ci95_p50 != a


def test_tail_flags_follow_mlperf_minimums():
    assert MIN_SAMPLES == {"p90": 64, "p99": 662}
    assert Stats(range(63)).too_few_for == ["p90", "p99"]
    assert Stats(range(64)).too_few_for == ["p99"]
    assert Stats(range(662)).too_few_for == []


def test_single_sample_and_empty():
    d = summarize([2.0])
    assert d["std"] == 0 and d["ci95_p50"] == [2.0, 2.0]
    with pytest.raises(ValueError):
        Stats([])


def test_large_sample_bootstrap_bounded():
    s = Stats(np.random.default_rng(0).normal(5, 1, 50_000))
    lo, hi = s.ci95_p50
    assert lo < 5.01 and hi > 4.99
