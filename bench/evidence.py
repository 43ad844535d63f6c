"""The evidence behind a red line about accuracy: two runs of the same evaluation set,
paired sample by sample, with an exact McNemar test on the samples they disagree on.

On a fixed set, what one configuration gets right and another gets wrong is all that tells
them apart; the samples both get right (or wrong) say nothing. With `b` samples right only
in the first and `c` only in the second, under "no difference" each of the b + c is a fair
coin, so the two-sided exact p-value is the binomial tail of min(b, c) in b + c. A 16-sample
set with one flipped prediction cannot reach p < 0.05 at all (one disagreement: p = 1): it
says "not enough samples to tell" instead of a red line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ALPHA = 0.05        # a red line needs p below this


@dataclass(frozen=True)
class Paired:
    n: int                  # samples compared
    only_first: int         # right in the first run only (b)
    only_second: int        # right in the second run only (c)
    p: float                # exact two-sided McNemar p-value
    decidable: bool         # could any split of b + c reach p < ALPHA?

    @property
    def significant(self) -> bool:
        return self.decidable and self.p < ALPHA

    def says(self, first: str = "device", second: str = "simulation") -> str:
        """One line of evidence: the counts and the p-value, or why none can be had."""
        if not self.decidable:
            return (f"not enough samples to tell: {self.only_first + self.only_second} of "
                    f"{self.n} differ ({self.only_first} right only on the {first}, "
                    f"{self.only_second} only in the {second})")
        return (f"{self.only_first} of {self.n} samples right only on the {first}, "
                f"{self.only_second} only in the {second}: exact McNemar p = {self.p:.2g}")

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired(first: str, second: str) -> Paired | None:
    """Per-sample hits of two runs (`hilq.accuracy.bits` strings, same set, same order)
    compared; None when either is missing or they cover different samples."""
    if not first or not second or len(first) != len(second):
        return None
    from scipy.stats import binomtest

    b = sum(1 for x, y in zip(first, second) if x == "1" and y == "0")
    c = sum(1 for x, y in zip(first, second) if x == "0" and y == "1")
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    decidable = b + c > 0 and 2 * 0.5 ** (b + c) < ALPHA
    return Paired(len(first), b, c, float(min(1.0, p)), decidable)
