"""Reports: one run from the store as Markdown (`report.md`, plots beside it as PNG) and as a
self-contained HTML page (`report.html`, plots embedded as data URIs).

The run's data is read once (data.py); each section's builder turns it into plain blocks
(sections.py lists them in order); markdown.py and html.py only format those, so both files
always say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hilq.quant.spec import SpecError

from . import html, markdown
from .data import load
from .index import render_index
from .model import Report, Section, fmt, mean_std
from .runs import pareto_front
from .sections import REGISTRY, SECTIONS, build, shown

__all__ = ["REGISTRY", "SECTIONS", "Report", "ReportOptions", "Section", "fmt", "mean_std",
           "pareto_front", "render", "render_index", "report"]


@dataclass(frozen=True)
class ReportOptions:
    """What `report` renders: one run (`run`: an id or "latest") to `out` (default
    reports/<run-id>/), or with `index` the page across all runs (default reports/); `db`:
    the store (None: $HILQ_DB or results/hilq.sqlite)."""

    run: str = "latest"
    db: str | None = None
    out: str | None = None
    index: bool = False

    def __post_init__(self):
        if not isinstance(self.run, str) or not self.run.strip():
            raise SpecError(f"run {self.run!r}: give a run id or 'latest'")


def report(options: ReportOptions | None = None):
    """The report verb: render what `options` name from the store; the `Report` (or, for the
    index, the `IndexPage`) with the paths written."""
    from ..store import open_store

    o = options or ReportOptions()
    with open_store(o.db) as store:
        return render_index(store, o.out) if o.index else render(store, o.run, o.out)


def render(store, run: str | None = "latest", out_dir: str | Path | None = None) -> Report:
    """Write `<out_dir>/report.md` (+ `plots/*.png`) and `<out_dir>/report.html` for a run
    (`latest` or an id); `out_dir` defaults to `reports/<run-id>/`."""
    run_id = store.resolve_run(run)
    data = load(store, run_id)
    sections = build(data)
    out = Path(out_dir) if out_dir else Path("reports") / run_id
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for p in (p for s in sections for p in s.plots):
        (plots / f"{p.name}.png").write_bytes(p.png)
    md = out / "report.md"
    md.write_text(markdown.page(run_id, shown(sections)))
    page = out / "report.html"
    page.write_text(html.page(run_id, shown(sections)))
    return Report(run_id, out, md, page, {s.title: s.has_data for s in sections},
                  sum(len(s.plots) for s in sections), sum(bool(g["flagged"]) for g in data.regs))
