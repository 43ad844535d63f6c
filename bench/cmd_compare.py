"""`hilq compare`: two runs side by side, every series measured in both, like `asv compare`.

    hilq compare [RUN_A] [RUN_B] [--db URL|PATH] [--out DIR] [--json OUT]

Prints one line per series (slowest first) and writes `compare.md` and `compare.html` to
DIR (default reports/compare-<A>-vs-<B>/). The verdicts are bench/compare.py's.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

EPILOG = ("RUN_A and RUN_B are run ids, 'latest' or 'previous' (the run before the latest); "
          "the defaults compare the previous run (A) with the latest (B). Exit status: 0 "
          "when no series is significantly slower in B, 3 when at least one is (a CI can "
          "fail on it), 2 on bad input (unknown run, no series in common).")
HEAD = ["series", "A p50 ms", "B p50 ms", "B/A", "A 95% CI", "B 95% CI", "verdict", "p",
        "accuracy", "note"]


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("run_a", nargs="?", default="previous", metavar="RUN_A",
                        help="the run compared against: id, 'latest' or 'previous' (default)")
    parser.add_argument("run_b", nargs="?", default="latest", metavar="RUN_B",
                        help="the run compared: id, 'latest' (default) or 'previous'")
    parser.add_argument("--db", default=None, metavar="URL|PATH",
                        help="results store (default $HILQ_DB or results/hilq.sqlite)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default reports/compare-<A>-vs-<B>/)")
    parser.add_argument("--json", metavar="PATH", help="write the comparison as JSON")


def run(args) -> int:
    from .cli import console
    from .cmd_report import store_errors
    from .compare import compare_runs, resolve
    from .output import write_json
    from .store import open_store

    with store_errors(), open_store(args.db) as store:
        a, b = resolve(store, args.run_a), resolve(store, args.run_b)
        cmp = compare_runs(store, a, b)
    if not cmp.rows:
        raise UserError(f"runs {a} and {b} have no series in common")
    out = Path(args.out) if args.out else Path("reports") / f"compare-{a}-vs-{b}"
    md, page = write(cmp, out)
    con = console()
    con.print(table(cmp))
    con.print(f"{len(cmp.slower)} of {len(cmp.rows)} series significantly slower in B; "
              f"markdown {md}, html {page}", soft_wrap=True)
    write_json(args.json, cmp.to_dict())
    return 3 if cmp.slower else 0


def cells(r) -> list[str]:
    """One row of the table, as text: the same in the terminal, Markdown and HTML."""
    from .report.model import fmt, fmt_p

    acc = "; ".join(f"{d.metric} {100 * d.a:.2f}→{100 * d.b:.2f} {d.verdict}"
                    for d in r.accuracy) or "–"
    return [r.label, fmt(r.a), fmt(r.b), f"{r.ratio:.3f}", _ci(r.ci_a), _ci(r.ci_b),
            r.verdict, fmt_p(r.p_value), acc, r.note]


def _ci(ci) -> str:
    from .report.model import fmt

    return "–" if ci is None else f"[{fmt(ci.lo)}, {fmt(ci.hi)}] {ci.source}"


def table(cmp):
    """The rich table, one line per series (cells never wrap)."""
    from rich.table import Table

    t = Table(title=f"A = {cmp.run_a}   B = {cmp.run_b}")
    for h in HEAD:
        t.add_column(h, no_wrap=True)
    style = {"slower": "bold red", "faster": "green"}
    for r in cmp.rows:
        t.add_row(*cells(r), style=style.get(r.verdict))
    return t


def sections(cmp) -> list:
    """The page: the rule, the table, accuracy evidence, and what only one run measured."""
    from .report.model import Section, Table, Text

    head = [Text(f"A = `{cmp.run_a}`, B = `{cmp.run_b}`. Sorted by B/A, slowest first. "
                 "faster/slower: regression rule of bench/regress.py (change ≥ 5% and "
                 "significant beyond round-to-round noise); noise: ≥ 5% but not backed by "
                 "the tests. CI source: rounds (t-interval over the rounds' p50), stored "
                 "(the device's bootstrap), or samples (bootstrap here)."),
            Table(HEAD, [cells(r) for r in cmp.rows])]
    if cmp.slower:
        head.insert(0, Text(f"{len(cmp.slower)} series significantly slower in B", alert=True))
    out = [Section("Latency p50", head)]
    acc = [[r.label, d.metric, f"{100 * d.a:.2f}", f"{100 * d.b:.2f}", d.verdict, d.note]
           for r in cmp.rows for d in r.accuracy]
    if acc:
        out.append(Section("Accuracy on the device", [Table(
            ["series", "metric", "A %", "B %", "verdict", "evidence"], acc)]))
    only = [[" ".join(k), side] for side, keys in (("A", cmp.only_a), ("B", cmp.only_b))
            for k in keys]
    if only:
        out.append(Section("Measured in one run only", [Table(["series", "run"], only)]))
    return out


def write(cmp, out: Path) -> tuple[Path, Path]:
    from .report.index import html_page, markdown_page

    out.mkdir(parents=True, exist_ok=True)
    title = f"hilq compare — {cmp.run_a} vs {cmp.run_b}"
    secs = sections(cmp)
    (md := out / "compare.md").write_text(markdown_page(title, secs))
    (page := out / "compare.html").write_text(html_page(title, secs))
    return md, page
