"""`hilq report`: render a run from the store as Markdown + self-contained HTML.

    hilq report [--run ID|latest] [--db URL|PATH] [--out DIR] [--json OUT]
                [--screenshot PNG [--size 1400x5000]]
    hilq report --index [--db URL|PATH] [--out DIR] [--json OUT]

Writes `<DIR>/report.md` (plots in `<DIR>/plots/`) and `<DIR>/report.html`; DIR defaults to
`reports/<run-id>/`. With `--index`, the page across all runs instead: `<DIR>/index.md`
and `<DIR>/index.html`, DIR defaulting to `reports/` (bench/report/index.py).
"""

from __future__ import annotations

from contextlib import contextmanager

from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    parser.add_argument("--run", default="latest", help="run id, or 'latest' (default)")
    parser.add_argument("--db", default=None, metavar="URL|PATH",
                        help="results store (default $HILQ_DB or results/hilq.sqlite)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default reports/<run-id>/)")
    parser.add_argument("--json", metavar="PATH", help="write what was rendered as JSON")
    parser.add_argument("--index", action="store_true",
                        help="write the index across runs instead (per series a trend with "
                             "CIs by commit, verdicts, links to each run's report) to "
                             "DIR/index.html and index.md, DIR default reports/")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="also capture the HTML page in headless Chromium (installed "
                             "separately: apt-get install -y chromium)")
    parser.add_argument("--size", default="1400x5000", metavar="WxH",
                        help="screenshot size in pixels (default 1400x5000)")


@contextmanager
def store_errors():
    """Store problems a user can fix (no such run, bad URL) become one-line errors."""
    from .store import StoreError

    try:
        yield
    except StoreError as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    from .report import ReportOptions, report

    o = ReportOptions(run=args.run, db=args.db, out=args.out, index=args.index)
    with store_errors():
        page = report(o)
    if o.index:
        print(f"index of {page.runs} runs, {page.series} series, {page.plots} plots")
    else:
        empty = [t for t, has in page.sections.items() if not has]
        print(f"report for run {page.run_id}: {page.plots} plots, "
              f"{page.flagged} regression(s) flagged")
    print(f"  markdown  {page.markdown}")
    print(f"  html      {page.html}")
    if not o.index and empty:
        print(f"  left out  {', '.join(empty)} (not in this run)")
    if args.screenshot:
        print(f"  screenshot {_screenshot(page.html, args.screenshot, args.size)}")
    write_json(args.json, page.to_dict())
    return 0


def _screenshot(html, png: str, size: str):
    import subprocess

    from .screenshot import screenshot

    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise UserError(f"--size {size!r}: expected WIDTHxHEIGHT in pixels, e.g. 1400x5000")
    try:
        return screenshot(html, png, width=int(width), height=int(height))
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--screenshot: {e}") from None
