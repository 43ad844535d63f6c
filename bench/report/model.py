"""The plain objects a report is made of, and how a value is spelt in a cell.

A section is a title and an ordered list of blocks (text, alerts, tables, plots); builders
make them from the run's data and the renderers only format them, so the Markdown and the
HTML page can never disagree on what a section says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Text:
    """A one-line paragraph; `alert`: a result that missed its target, shown in red."""

    text: str
    alert: bool = False


@dataclass(frozen=True)
class Table:
    head: list
    rows: list


@dataclass(frozen=True)
class Plot:
    """A rendered figure: `name` is its file stem in Markdown and its alt text in HTML."""

    name: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return self.title.lower().replace(" ", "-")

    @property
    def has_data(self) -> bool:
        """Tables or plots, not only a line saying why there are none."""
        return any(not isinstance(b, Text) for b in self.blocks)

    @property
    def plots(self) -> list[Plot]:
        return [b for b in self.blocks if isinstance(b, Plot)]


@dataclass(frozen=True)
class Report:
    run_id: str
    dir: Path
    markdown: Path
    html: Path
    sections: dict            # title -> has data
    plots: int
    flagged: int              # flagged verdicts (key x metric) in this run

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "dir": str(self.dir), "markdown": str(self.markdown),
                "html": str(self.html), "sections": self.sections, "plots": self.plots,
                "regressions_flagged": self.flagged}


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def fmt_p(p: float | None) -> str:
    """A p-value as read: two significant digits; one too small for a float is "<1e-16", not 0."""
    return "–" if p is None else "<1e-16" if p < 1e-16 else f"{p:.2g}"


def mean_std(mean: float | None, std: float | None) -> str:
    """"mean ± std" with both at the mean's precision (3 significant digits of the mean):
    0.0763 ± 0.0041, not 0.0763 ± 0.2."""
    if mean is None or std is None or not math.isfinite(mean) or not math.isfinite(std):
        return f"{fmt(mean)} ± {fmt(std, 2)}"
    decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def pct(x) -> str:
    return fmt(None if x is None else 100 * x, 4)


def kv(d) -> str:
    """Scalars as `k=v`; nested tables (a debug result, a list of notes) have their own
    sections and are left out rather than printed as a Python repr."""
    return ", ".join(f"{k}={fmt(v) if isinstance(v, int | float) else v}"
                     for k, v in (d or {}).items()
                     if v is not None and isinstance(v, int | float | str)) or "–"


def mj(j: float | None) -> str:
    return "–" if j is None else fmt(1000 * j)
