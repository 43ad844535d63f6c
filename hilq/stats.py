"""Statistics on raw latency samples, derived in one place so what is stored is explicit.

Like pytest-benchmark's `stats.py`: the raw samples are kept, every statistic is a named
property, and `FIELDS` lists what `as_dict()` stores. Part of the agent bundle: imports only
the standard library and numpy, never hilq, because it is copied to the device.

Percentiles use linear interpolation (numpy's default). A tail percentile computed from too
few samples is mostly the maximum, so it is flagged (`too_few_for`) with MLPerf's minimums.
The 95% CI of p50 is a seeded percentile bootstrap (1000 resamples, down to 200 for very
long runs), so the same samples give the same CI.
"""

from __future__ import annotations

import numpy as np

# Fewest samples for which a tail percentile is reported without a flag (MLPerf LoadGen).
MIN_SAMPLES = {"p90": 64, "p99": 662}
BOOTSTRAP_RESAMPLES = 1000

FIELDS = ("n", "mean", "std", "min", "max", "p50", "p90", "p95", "p99", "q1", "q3", "iqr",
          "outliers_low", "outliers_high", "ci95_p50", "cv", "too_few_for")


def percentile(sorted_samples: np.ndarray, q: float) -> float:
    return float(np.percentile(sorted_samples, q))


class Stats:
    """Statistics of one sample set (milliseconds, or any unit: nothing here assumes one)."""

    fields = FIELDS

    def __init__(self, samples, seed: int = 0):
        self.samples = np.sort(np.asarray(list(samples), dtype=np.float64))
        if self.samples.size == 0:
            raise ValueError("no samples")
        self.seed = seed

    @property
    def n(self) -> int:
        return int(self.samples.size)

    @property
    def mean(self) -> float:
        return float(self.samples.mean())

    @property
    def std(self) -> float:
        """Sample standard deviation (n-1); 0 for a single sample."""
        return float(self.samples.std(ddof=1)) if self.n > 1 else 0.0

    @property
    def cv(self) -> float | None:
        return self.std / self.mean if self.mean else None

    @property
    def min(self) -> float:
        return float(self.samples[0])

    @property
    def max(self) -> float:
        return float(self.samples[-1])

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 90)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def q1(self) -> float:
        return percentile(self.samples, 25)

    @property
    def q3(self) -> float:
        return percentile(self.samples, 75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def outliers_low(self) -> int:
        """Samples below Tukey's lower fence (Q1 - 1.5 IQR)."""
        return int(np.count_nonzero(self.samples < self.q1 - 1.5 * self.iqr))

    @property
    def outliers_high(self) -> int:
        """Samples above Tukey's upper fence (Q3 + 1.5 IQR): interruptions, preemption."""
        return int(np.count_nonzero(self.samples > self.q3 + 1.5 * self.iqr))

    @property
    def ci95_p50(self) -> list[float]:
        """Percentile-bootstrap 95% confidence interval of the median, seeded."""
        if self.n == 1:
            return [self.p50, self.p50]
        rng = np.random.default_rng(self.seed)
        # long runs (100k samples of a tiny model): fewer resamples, bounded time and memory
        total = min(BOOTSTRAP_RESAMPLES, max(200, 10_000_000 // self.n))
        per_chunk = max(1, 2_000_000 // self.n)
        medians = []
        for start in range(0, total, per_chunk):
            k = min(per_chunk, total - start)
            idx = rng.integers(0, self.n, size=(k, self.n))
            medians.append(np.median(self.samples[idx], axis=1))
        medians = np.concatenate(medians)
        lo, hi = np.percentile(medians, [2.5, 97.5])
        return [float(lo), float(hi)]

    @property
    def too_few_for(self) -> list[str]:
        """Tail percentiles whose value rests on too few samples to be trusted."""
        return [p for p, need in MIN_SAMPLES.items() if self.n < need]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.fields}


def summarize(samples, seed: int = 0) -> dict:
    return Stats(samples, seed).as_dict()
