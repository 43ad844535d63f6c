"""Sections as one self-contained HTML page: formatting only, plots embedded as data URIs,
inline CSS, no scripts, so a nightly's report can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html

from .model import Plot, Section, Table, Text

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.85rem;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;display:block;margin:.8rem 0}
code{background:#f4f4f4;padding:0 .2rem}nav a{margin-right:1rem}
.bad{color:#b00;font-weight:bold}
.alert{color:#fff;background:#b00;padding:.6rem .8rem;font-weight:bold;border-radius:4px}"""
BAD = ("YES", "REGRESSION", "MISSED")      # cells shown in red


def page(run_id: str, sections: list[Section]) -> str:
    return document(f"hilq report {run_id}", f"hilq report — run {run_id}", sections)


def document(title: str, heading: str, sections: list[Section], render=None) -> str:
    """A self-contained page: its sections, each block formatted by `render` (`block`)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>",
           "</head><body>", f"<h1>{html.escape(heading)}</h1>", "<nav>"]
    out += [f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections]
    out.append("</nav>")
    for s in sections:
        out += section(s, render or block)
    out.append("</body></html>")
    return "\n".join(out)


def section(s: Section, render=None) -> list[str]:
    out = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>']
    for b in s.blocks:
        out += (render or block)(b)
    return out + ["</section>"]


def block(b: Text | Table | Plot) -> list[str]:
    if isinstance(b, Text):
        return [f'<p class="alert">⚠ {_inline(b.text)}</p>' if b.alert
                else f"<p>{_inline(b.text)}</p>"]
    if isinstance(b, Plot):
        data = base64.b64encode(b.png).decode()
        return [f'<img alt="{b.name}" src="data:image/png;base64,{data}">']
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in b.head)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f'<td{" class=bad" if v in BAD else ""}>{html.escape(str(v))}</td>'
                             for v in row) + "</tr>" for row in b.rows]
    return out + ["</tbody></table>"]


def _inline(text: str) -> str:
    """`code` and **bold** in our own one-line texts, everything else escaped."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
