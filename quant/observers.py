"""Observers: watch activations during calibration and turn what they saw into qparams.

Every observer has the same two methods, `update(x)` and `qparams() -> (scale, zp)`;
`make_observer(spec)` picks one by `spec.calib`. Static calibration runs the observers
once over calibration data and freezes the result; dynamic quantization skips them and
takes each batch's own min-max at run time.
"""

from __future__ import annotations

import torch

from .quantizer import minmax, qparams
from .spec import QuantSpec


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


_OBSERVERS = {"minmax": MinMax, "ema": MovingAverageMinMax}


def make_observer(spec: QuantSpec):
    try:
        return _OBSERVERS[spec.calib](spec)
    except KeyError:
        raise ValueError(f"no observer for calibration {spec.calib!r}") from None
