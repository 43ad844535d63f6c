"""`hilq debug`'s result (see bench/cmd_debug.py) as a plot, a Markdown section and an HTML
section, for the report's per-configuration debug section.

The plot keeps the graph order (layers left to right as data flows), so where the SQNR
falls is where the error enters; the tables keep the result's worst-first order. Like
bench/report.py, plots use matplotlib's Agg canvas through `Figure` (no pyplot).
"""

from __future__ import annotations

import base64
import html
import io

SERIES = (("sqnr_db", "engine", "o-", "#1f77b4"),
          ("sqnr_db_simulated", "fake-quant", "s--", "#ff7f0e"),
          ("own_error_db", "own error (engine)", "v:", "#2ca02c"),
          ("own_error_db_simulated", "own error (fake-quant)", "^:", "#98df8a"))
HEAD = ["#", "layer", "precision", "SQNR dB", "simulated dB", "gap dB", "cosine", "own dB",
        "own simulated dB", "inherited dB"]


def _f(v, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _title(result: dict) -> str:
    where = (f"{result.get('runtime')} on {result.get('device')}" if result.get("runtime")
             else "simulation only")
    return f"{result.get('model')} {result.get('variant')}, {where}, {result.get('n')} samples"


def figure(result: dict):
    """Per-layer SQNR (engine, fake-quant) and own error, in graph order."""
    from matplotlib.figure import Figure

    rows = sorted(result["layers"], key=lambda r: r["index"])
    names = [r["layer"] for r in rows]
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(rows))
    for key, label, style, color in SERIES:
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, color=color,
                    label=label, markersize=4)
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR vs float (dB, higher is better)")
    ax.set_title(f"per-layer error: {_title(result)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot(result: dict, path) -> None:
    figure(result).savefig(path, format="png", dpi=110)


def rows(result: dict) -> list[list[str]]:
    return [[str(i), r["layer"], str(r.get("precision") or ""), _f(r.get("sqnr_db")),
             _f(r.get("sqnr_db_simulated")), _f(r.get("gap_db"), "+.2f"),
             _f(r.get("cosine"), ".5f"), _f(r.get("own_error_db")),
             _f(r.get("own_error_db_simulated")), _f(r.get("inherited_db"))]
            for i, r in enumerate(result["layers"], 1)]


def lines(result: dict) -> list[str]:
    out = []
    if result.get("culprits"):
        out.append(f"Error introduced most at `{result['culprits'][0]}` (lowest own error: "
                   "the layer fed the float model's input).")
    if result.get("status") not in (None, "ok", "simulated"):
        out.append(f"Engine run: {result.get('status')}"
                   + (f" ({result.get('reason')})" if result.get("reason") else "") + ".")
    return out + [f"Note: {n}" for n in result.get("notes") or []]


def section(result: dict) -> str:
    """Markdown: a heading, the worst-first table, the plot when `result["plot"]` names one."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    out = [f"### Per-layer error: {_title(result)}", ""]
    out += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows(result)]
    out.append("")
    for line in lines(result):
        out += [line, ""]
    if result.get("plot"):
        out += [f"![per-layer error]({result['plot']})", ""]
    return "\n".join(out)


def html_section(result: dict) -> str:
    """Self-contained HTML: the table and the plot embedded as a data URI."""
    buf = io.BytesIO()
    figure(result).savefig(buf, format="png", dpi=96)
    data = base64.b64encode(buf.getvalue()).decode()
    out = [f"<section><h3>Per-layer error: {html.escape(_title(result))}</h3>",
           "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEAD)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in rows(result)]
    out.append("</tbody></table>")
    out += [f"<p>{html.escape(line).replace('`', '')}</p>" for line in lines(result)]
    out.append(f'<img alt="per-layer error" src="data:image/png;base64,{data}">')
    out.append("</section>")
    return "\n".join(out)
