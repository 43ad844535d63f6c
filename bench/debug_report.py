"""`hilq debug`'s result as a plot file (`hilq debug --plot`), and as one report section in
Markdown or HTML. The per-layer table, notes and figure are the report's own
(bench/report/searches.py, plots.py), so `hilq debug` and the nightly report show the same."""

from __future__ import annotations

from .report import html, markdown, plots
from .report.model import Plot, Section, Table, Text
from .report.searches import LAYER_HEAD, layer_lines, layer_rows, layer_title


def plot(result: dict, path) -> None:
    plots.layer_error(result, layer_title(result)).savefig(path, format="png", dpi=110)


def _section(result: dict, *extra) -> Section:
    """The worst-first table and the notes, as the report has them, then `extra` blocks."""
    return Section(f"Per-layer error: {layer_title(result)}",
                   [Table(LAYER_HEAD, layer_rows(result)), *map(Text, layer_lines(result)),
                    *extra])


def section(result: dict) -> str:
    """Markdown, linking the plot file when `result["plot"]` names one (`hilq debug --plot`)."""
    link = [Text(f"![per-layer error]({result['plot']})")] if result.get("plot") else []
    return "\n".join(markdown.section(_section(result, *link)))


def html_section(result: dict) -> str:
    """Self-contained HTML, the plot embedded as a data URI."""
    fig = plots.layer_error(result, layer_title(result))
    return "\n".join(html.section(_section(result, Plot("per-layer error", plots.png(fig)))))
