"""Observers: watch activations during calibration and turn what they saw into qparams.

Every observer has the same methods, `update(x)`, `range() -> (lo, hi)` and
`qparams() -> (scale, zp)`; `make_observer(spec)` picks one by `spec.calib`:
min-max, moving-average min-max (per tensor or per channel), and the per-tensor histogram
observers percentile, MSE-optimal clipping and entropy (KL, TensorRT's method). Static calibration runs the observers
once over calibration data and freezes the result; dynamic quantization skips them and
takes each batch's own min-max at run time.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantizer import EPS, minmax, qparams
from .spec import QuantSpec, SpecError


class MinMax:
    """Running min and max over all calibration batches."""

    def __init__(self, spec: QuantSpec):
        self.spec, self.lo, self.hi = spec, None, None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data: run calibration before freezing")
        return self.lo, self.hi

    def qparams(self):
        return qparams(*self.range(), self.spec)


class MovingAverageMinMax(MinMax):
    """Exponential moving average of per-batch min and max: robust to one odd batch."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.9):
        super().__init__(spec)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi


class _Histogram:
    """A fixed-size histogram whose range grows to cover every batch: bounded memory however
    many activations calibration sees. `absolute` bins |x| on [0, max] (symmetric specs);
    otherwise x on [min, max] — the range TensorRT's calibrator uses. When a batch falls outside
    it, the range grows to the new extreme and the old counts move into the new bins by their
    bin centres (as PyTorch's HistogramObserver does), smearing them by under a bin; with i.i.d.
    batches a new extreme, hence a re-binning, is rare (about log(batches) times)."""

    def __init__(self, bins: int = 2048, absolute: bool = False):
        self.bins, self.absolute = bins, absolute
        self.counts: torch.Tensor | None = None
        self.lo = self.hi = 0.0
        self.xmin, self.xmax = float("inf"), float("-inf")  # what was actually seen
        self.zeros = 0.0  # exact zeros (e.g. post-ReLU): every grid represents them exactly

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        self.xmin, self.xmax = min(self.xmin, float(x.min())), max(self.xmax, float(x.max()))
        self.zeros += float((x == 0).sum())
        if self.absolute:
            x = x.abs()
        lo, hi = float(x.min()), float(x.max())
        if self.absolute:
            lo = 0.0
        if self.counts is None:
            self.lo, self.hi = lo, max(hi, lo + 1e-8)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            centres, old = self.centres(), self.counts
            self.lo, self.hi = min(lo, self.lo), max(hi, self.hi)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
            self.counts.index_add_(0, self._index(centres), old)
        self.counts.index_add_(0, self._index(x), torch.ones(x.numel(), dtype=torch.float64))

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        return ((x.double() - self.lo) / width).floor().clamp(0, self.bins - 1).long()

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def centres(self) -> torch.Tensor:
        e = self.edges()
        return (e[1:] + e[:-1]) / 2

    def quantile(self, q: float) -> float:
        """The value below which a fraction q of the mass lies, linear inside a bin."""
        cdf = torch.cumsum(self.counts, 0) / self.counts.sum()
        i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(max=self.bins - 1))
        below = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(cdf[i]) - below
        frac = (q - below) / inside if inside > 0 else 1.0
        return self.lo + (i + min(max(frac, 0.0), 1.0)) * self.width


class _HistogramObserver:
    """Shared plumbing of the per-tensor histogram observers: `update`, `range`, `qparams`.
    Subclasses implement `_range()` on `self.hist`."""

    absolute_for_symmetric = True

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        if spec.granularity != "tensor":
            raise SpecError(f"{spec.calib} calibration is per-tensor; got granularity "
                            f"{spec.granularity!r} (use minmax or ema for per-channel)")
        self.spec = spec
        self.hist = _Histogram(bins, absolute=spec.symmetric and self.absolute_for_symmetric)
        self._cached = None

    def update(self, x: torch.Tensor) -> None:
        self.hist.update(x)
        self._cached = None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist.counts is None:
            raise RuntimeError("observer saw no data: run calibration before freezing")
        if self._cached is None:
            lo, hi = self._range()
            self._cached = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
        return self._cached

    def qparams(self):
        return qparams(*self.range(), self.spec)

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError


class Percentile(_HistogramObserver):
    """Clip at the `spec.percentile`-th percentile: of |x| for symmetric specs (range ±p),
    of each tail for asymmetric ones (lo at 100 − p, hi at p). Outliers beyond it saturate."""

    def _range(self):
        q = self.spec.percentile / 100.0
        h = self.hist
        if h.absolute:
            amax = h.quantile(q)
            return -amax, amax
        return h.quantile(1.0 - q), h.quantile(q)


class MSE(_HistogramObserver):
    """The clipping range minimising the expected ‖x − Q(x)‖² for the spec's grid, searched
    on a grid of candidate ranges and evaluated on the histogram (bin centres weighted by
    counts), so its cost does not grow with the number of batches. Symmetric: 100 candidate
    thresholds on |x|. Asymmetric: a 40 × 40 grid of (lo, hi) shrink factors."""

    steps = 100
    steps_2d = 40

    def _range(self):
        h = self.hist
        v, n = h.centres().float(), h.counts.float()
        spec = self.spec.with_(rounding="nearest")
        if h.absolute:
            amax = h.hi * torch.linspace(1.0 / self.steps, 1.0, self.steps)
            scale = (amax / spec.qmax).clamp(min=EPS)[:, None]
            # |x| on the non-negative half of the grid: codes 0..qmax
            err = ((torch.clamp(torch.round(v / scale), 0, spec.qmax) * scale - v) ** 2 * n).sum(1)
            best = float(amax[int(err.argmin())])
            return -best, best
        f = torch.linspace(1.0 / self.steps_2d, 1.0, self.steps_2d)
        lo = (min(h.lo, 0.0) * f)[:, None].expand(-1, len(f)).reshape(-1)
        hi = (max(h.hi, 0.0) * f)[None, :].expand(len(f), -1).reshape(-1)
        scale, zp = qparams(lo, hi, spec)
        err = torch.zeros(len(lo))
        for i in range(0, len(lo), 200):  # bounded memory: 200 × bins at a time
            s, z = scale[i:i + 200, None], zp[i:i + 200, None]
            deq = (torch.clamp(torch.round(v / s) + z, spec.qmin, spec.qmax) - z) * s
            err[i:i + 200] = ((deq - v) ** 2 * n).sum(1)
        k = int(err.argmin())
        return float(lo[k]), float(hi[k])


class Entropy(_HistogramObserver):
    """TensorRT's entropy calibration (Migacz, GTC 2017): a 2048-bin histogram of |x|; for
    each candidate threshold T (bin i), P is the histogram clipped at T (outliers added to the
    last bin) and Q is P merged into N levels and expanded back; T minimises KL(P‖Q).

    N = 2^(bits−1) for symmetric specs (TensorRT's 128 at 8 bits: the positive half of a signed
    grid). Asymmetric specs: the threshold is still found on |x|; if everything seen is ≥ 0
    (post-ReLU) the whole unsigned grid lies on the positive side, so N = 2^bits and the range
    is [0, T]; otherwise N = 2^(bits−1) and the range is [max(min, −T), min(max, T)].
    Exact zeros are left out of the search: zero is exact on every grid, and the spike that
    ReLU puts there would otherwise dominate KL and pull T far too low."""

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        super().__init__(spec, bins)
        self.hist.absolute = True  # always |x|; the sign is read from hist.xmin

    def _range(self):
        h = self.hist
        nonneg = h.xmin >= 0.0
        levels = 2**self.spec.bits if (nonneg and not self.spec.symmetric) else 2 ** (self.spec.bits - 1)
        counts = h.counts.clone()
        if h.lo == 0.0:
            counts[0] = (counts[0] - h.zeros).clamp(min=0.0)
        i = kl_threshold_bin(counts.numpy(), levels)
        t = h.lo + i * h.width
        if self.spec.symmetric:
            return -t, t
        return max(h.xmin, -t), min(h.xmax, t)


def kl_threshold_bin(hist: np.ndarray, levels: int) -> int:
    """Number of leading bins (the threshold's bin edge) whose clipped distribution P loses
    least information, KL(P‖Q), when requantized to `levels` levels (TensorRT's search).
    Q spreads each merged level's mass evenly over the bins of P that were nonzero."""
    hist = np.asarray(hist, dtype=np.float64)
    n = len(hist)
    if levels >= n:
        return n
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0.0]])  # mass beyond bin i
    best_kl, best_i = np.inf, n
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += tail[i - 1]
        if p.sum() == 0:
            continue
        sliced = hist[:i]
        starts = (np.arange(levels) * i) // levels
        sums = np.add.reduceat(sliced, starts)
        nz = sliced > 0
        nonzero = np.add.reduceat(nz.astype(np.float64), starts)
        owner = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        q = np.where(nz, (sums / np.maximum(nonzero, 1.0))[owner], 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p‖q) of unnormalised histograms; q's empty bins where p has mass get a small eps
    (the smoothing TensorRT-style calibrators use), so a clipped tail is penalised, not inf."""
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return np.inf
    q = q / qs
    q = np.where((q == 0) & (p > 0), eps, q)
    q = q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


_OBSERVERS = {"minmax": MinMax, "ema": MovingAverageMinMax, "percentile": Percentile,
              "mse": MSE, "entropy": Entropy}


def make_observer(spec: QuantSpec):
    """The observer `spec.calib` names. Dynamic specs need none (their range is taken per
    batch at run time) but one is still returned if asked for."""
    try:
        cls = _OBSERVERS[spec.calib]
    except KeyError:
        raise ValueError(f"no observer for calibration {spec.calib!r}") from None
    return cls(spec)
