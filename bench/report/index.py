"""The index across runs (`hilq report --index`): every run in order with its commit, status,
flagged regressions and a link to its report, then, model by model, every series' p50 per
run with its 95% CI as error bars and each run's regression verdicts.

Nothing is cut: all series of all runs appear, grouped by model, at most PANELS series to a
figure (a model with more gets several figures). Links are relative, so the reports folder
can be moved or archived whole; a run whose report was never rendered says so beside the
link. The HTML is self-contained like a run's report (plots as data URIs, no scripts).
"""

from __future__ import annotations

import html as _html
import os
from dataclasses import dataclass
from pathlib import Path

from . import html, markdown, plots
from .model import Plot, Section, Table, Text, fmt

PANELS = 12                  # series per figure: more panels than this are unreadable


@dataclass(frozen=True)
class Link:
    """A table cell that links; str() is its Markdown form."""

    text: str
    href: str

    def __str__(self) -> str:
        return f"[{self.text}]({self.href})"


@dataclass
class RunInfo:
    id: str
    started: str
    commit: str              # short git SHA, or "no git"
    status: str
    link: Link
    rendered: bool           # its report.html exists


@dataclass(frozen=True)
class IndexPage:
    dir: Path
    markdown: Path
    html: Path
    runs: int
    series: int
    plots: int

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "markdown": str(self.markdown), "html": str(self.html),
                "runs": self.runs, "series": self.series, "plots": self.plots}


def render_index(store, out_dir: str | Path | None = None,
                 reports_dir: str | Path = "reports") -> IndexPage:
    """Write `<out_dir>/index.md` (+ `plots/index-*.png`) and `<out_dir>/index.html`;
    `out_dir` defaults to `reports_dir`, where `hilq report` puts each run's folder."""
    from hilq.bench.store import StoreError

    out = Path(out_dir) if out_dir else Path(reports_dir)
    runs = [run_info(r, out, Path(reports_dir)) for r in reversed(store.runs())]
    if not runs:
        raise StoreError(f"no runs in {store.name}")
    points = series_points(store, runs)
    sections = [runs_section(runs, store.regressions(flagged_only=True))]
    for model in dict.fromkeys(k[0] for k in points):
        sections.append(model_section(model, {k: p for k, p in points.items()
                                              if k[0] == model}, runs))
    figs = [p for s in sections for p in s.plots]
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for p in figs:
        (out / "plots" / f"{p.name}.png").write_bytes(p.png)
    title = f"hilq index — {len(runs)} runs, {len(points)} series"
    (md := out / "index.md").write_text(markdown_page(title, sections))
    (page := out / "index.html").write_text(html_page(title, sections))
    return IndexPage(out, md, page, len(runs), len(points), len(figs))


def run_info(row: dict, out: Path, reports: Path) -> RunInfo:
    target = reports / row["id"] / "report.html"
    href = Path(os.path.relpath(target, out)).as_posix()
    sha = row.get("git_sha")
    return RunInfo(row["id"], row["started"], sha[:8] if sha else "no git", row["status"],
                   Link("report", href), target.is_file())


def series_points(store, runs: list[RunInfo]) -> dict[tuple, list[dict]]:
    """(model, variant, device, runtime) -> one point per run that measured it, in run
    order: p50, its CI (bench.compare.ci95), that run's verdicts of the series and
    whether its p50 was flagged (what the trend circles)."""
    from hilq.bench.compare import series

    verdicts: dict[tuple, list[dict]] = {}
    for g in store.regressions():
        key = (g["run_id"], g["model"], g["variant"], g["device"], g["runtime"])
        verdicts.setdefault(key, []).append(g)
    out: dict[tuple, list[dict]] = {}
    for i, run in enumerate(runs):
        for key, side in series(store, run.id).items():
            ci = side.ci
            regs = verdicts.get((run.id, *key), [])
            out.setdefault(key, []).append(dict(
                run=i, label=run.commit, value=side.p50, lo=ci and ci.lo, hi=ci and ci.hi,
                source=ci.source if ci else None, verdicts=regs,
                flagged=any(g["flagged"] and g["metric"] == "p50" for g in regs)))
    return dict(sorted(out.items()))


def runs_section(runs: list[RunInfo], flagged: list[dict]) -> Section:
    count: dict[str, int] = {}
    for g in flagged:
        count[g["run_id"]] = count.get(g["run_id"], 0) + 1
    rows = [[i + 1, r.id, r.started[:16].replace("T", " "), r.commit, r.status,
             count.get(r.id, 0), r.link, "" if r.rendered else
             f"not rendered (hilq report --run {r.id})"] for i, r in enumerate(runs)]
    return Section("Runs", [
        Text("Oldest first; the trends below number runs the same way and label them by "
             "commit."),
        Table(["#", "run", "started (UTC)", "commit", "status", "regressions flagged",
               "report", ""], rows)])


def model_section(model: str, points: dict[tuple, list[dict]], runs: list[RunInfo]) -> Section:
    """One model's series: trend figures of at most PANELS series, then a row per series and
    run with its p50, CI and verdicts."""
    keys = list(points)
    blocks: list = [Text(f"{len(keys)} series. Error bars: the 95% CI of each run's p50; "
                         "red circles: runs where its p50 was flagged (other flagged "
                         "metrics, accuracy or energy, are in the table).")]
    for n, start in enumerate(range(0, len(keys), PANELS)):
        panels = [(f"{k[1]} · {k[2]}/{k[3]}", points[k]) for k in keys[start:start + PANELS]]
        blocks.append(Plot(f"index-{_slug(model)}-{n + 1}", plots.png(plots.ci_trends(panels))))
    rows = [[k[1], f"{k[2]}/{k[3]}", p["run"] + 1, p["label"], fmt(p["value"]), _ci(p),
             "REGRESSION" if any(g["flagged"] for g in p["verdicts"]) else "",
             _verdicts(p["verdicts"]),
             runs[p["run"]].link] for k in keys for p in points[k]]
    blocks.append(Table(["variant", "device/runtime", "run #", "commit", "p50 ms",
                         "95% CI (source)", "flagged", "verdicts", "report"], rows))
    return Section(f"Model {model}", blocks)


def _ci(p: dict) -> str:
    if p["lo"] is None:
        return "–"
    return f"{fmt(p['lo'])} – {fmt(p['hi'])} ({p['source']})"


def _verdicts(regs: list[dict]) -> str:
    """The run's verdicts of the series: flagged ones in full, the rest counted."""
    if not regs:
        return "not checked"
    bad = [f"{g['metric']}: {g['note']}" for g in regs if g["flagged"]]
    ok = len(regs) - len(bad)
    return "; ".join(bad + ([f"{ok} metric(s) without regression"] if ok else []))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def markdown_page(title: str, sections: list[Section]) -> str:
    return markdown.document(title, sections)


def html_page(title: str, sections: list[Section]) -> str:
    """A self-contained page of sections under its own title; tables may hold `Link`s."""
    return html.document(title, title, sections,
                         lambda b: _table(b) if isinstance(b, Table) else html.block(b))


def _table(b: Table) -> list[str]:
    out = ["<table><thead><tr>" + "".join(f"<th>{_html.escape(str(h))}</th>" for h in b.head)
           + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in b.rows]
    return out + ["</tbody></table>"]


def _cell(v) -> str:
    if isinstance(v, Link):
        return (f'<td><a href="{_html.escape(v.href, quote=True)}">'
                f"{_html.escape(v.text)}</a></td>")
    bad = " class=bad" if v in html.BAD else ""
    return f"<td{bad}>{_html.escape(str(v))}</td>"
