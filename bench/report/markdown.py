"""Sections as Markdown: formatting only. A plot is a link to `plots/<name>.png`; writing
the PNG beside it is the caller's job (bench/report/__init__.py)."""

from __future__ import annotations

from .model import Plot, Section, Table, Text


def page(run_id: str, sections: list[Section]) -> str:
    return document(f"hilq report — run {run_id}", sections)


def document(title: str, sections: list[Section]) -> str:
    """A page of sections under its title, with a table of contents."""
    out = [f"# {title}", ""]
    out += [f"- [{s.title}](#{s.anchor})" for s in sections] + [""]
    for s in sections:
        out += section(s)
    return "\n".join(out)


def section(s: Section) -> list[str]:
    out = [f"## {s.title}", ""]
    for b in s.blocks:
        out += block(b) + [""]
    return out


def block(b: Text | Table | Plot) -> list[str]:
    if isinstance(b, Text):
        return [f"> **⚠ {b.text}**" if b.alert else b.text]
    if isinstance(b, Plot):
        return [f"![{b.name}](plots/{b.name}.png)"]
    return ([_row(b.head), "|" + "---|" * len(b.head)] + [_row(r) for r in b.rows])


def _row(values: list) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ")
                             for v in values) + " |"
