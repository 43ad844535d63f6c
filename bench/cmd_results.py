"""`hilq results`: export or inspect the results store.

    hilq results runs [--limit N]
    hilq results export --format csv|parquet --out DIR [--table T ...]
    hilq results regressions [--run ID|latest] [--detect] [--all]
    hilq results mark-intended --model M --variant V --device D --runtime R
                               [--run ID|latest] [--metric p50] --reason TEXT

All take `--db URL|PATH` (default $HILQ_DB or results/hilq.sqlite) and `--json OUT`.
`mark-intended` records that a change at that run was meant (a new kernel, a more accurate
variant), so history before it stops being the baseline, and re-runs detection for the run.
"""

from __future__ import annotations

import argparse

from .cmd_report import store_errors
from .output import write_json


def add_arguments(parser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, metavar="URL|PATH",
                        help="results store (default $HILQ_DB or results/hilq.sqlite)")
    common.add_argument("--json", metavar="PATH", help="write the result as JSON")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("runs", parents=[common], help="list runs, newest first")
    p.add_argument("--limit", type=int, default=20)

    p = sub.add_parser("export", parents=[common], help="write every table as CSV or Parquet")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--table", action="append", default=None,
                   help="only this table (repeatable; default all)")

    p = sub.add_parser("regressions", parents=[common], help="regression verdicts of a run")
    p.add_argument("--run", default="latest")
    p.add_argument("--detect", action="store_true",
                   help="run detection now (replaces the run's stored verdicts)")
    p.add_argument("--all", action="store_true", help="show unflagged comparisons too")

    p = sub.add_parser("mark-intended", parents=[common],
                       help="mark a change as intended: the baseline restarts at that run")
    p.add_argument("--run", default="latest", help="first run of the new baseline")
    for key in ("model", "variant", "device", "runtime"):
        p.add_argument(f"--{key}", required=True)
    p.add_argument("--metric", default=None, help="only this metric (default: all)")
    p.add_argument("--reason", required=True, help="why the change is expected")


def run(args) -> int:
    from .store import open_store

    with store_errors(), open_store(args.db) as store:
        return ACTIONS[args.action](store, args)


def _runs(store, args) -> int:
    rows = store.runs(args.limit)
    flagged = {}
    for g in store.regressions(flagged_only=True):
        flagged[g["run_id"]] = flagged.get(g["run_id"], 0) + 1
    out = [{k: r[k] for k in ("id", "started", "ended", "status", "git_sha", "config_hash")}
           | {"regressions": flagged.get(r["id"], 0)} for r in rows]
    if not out:
        print(f"no runs in {store.name}")
    for r in out:
        print(f"{r['id']:<32} {r['status']:<9} {r['started'][:19]}  "
              f"git {(r['git_sha'] or '-')[:10]:<10}  regressions {r['regressions']}")
    write_json(args.json, {"runs": out})
    return 0


def _export(store, args) -> int:
    from .store import TABLES, StoreError, export

    tables = args.table or TABLES
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise StoreError(f"unknown table(s) {', '.join(sorted(unknown))} "
                         f"(use {', '.join(TABLES)})")
    files = export(store, args.out, args.format, tables)
    for f in files:
        print(f"  {f}")
    print(f"exported {len(files)} table(s) as {args.format} to {args.out}")
    write_json(args.json, {"format": args.format, "files": [str(f) for f in files]})
    return 0


def _regressions(store, args) -> int:
    from .regress import detect

    run_id = store.resolve_run(args.run)
    rows = detect(store, run_id) if args.detect else store.regressions(run_id)
    shown = rows if args.all else [r for r in rows if r["flagged"]]
    n = sum(bool(r["flagged"]) for r in rows)
    print(f"run {run_id}: {n} of {len(rows)} comparison(s) flagged"
          + ("" if rows else " (no verdicts stored: use --detect)"))
    for r in shown:
        change = "–" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        print(f"  {'REGRESSION' if r['flagged'] else 'ok':<10} {r['model']} {r['variant']} "
              f"{r['device']}/{r['runtime']} {r['metric']}: {change}  {r['note']}")
    write_json(args.json, {"run_id": run_id, "flagged": n, "verdicts": rows})
    return 0


def _mark(store, args) -> int:
    from .regress import detect

    run_id = store.resolve_run(args.run)
    key = (args.model, args.variant, args.device, args.runtime)
    store.mark_intended(run_id, *key, metric=args.metric, reason=args.reason)
    rows = [r for r in detect(store, run_id)
            if (r["model"], r["variant"], r["device"], r["runtime"]) == key]
    print(f"marked intended at run {run_id}: {' '.join(key)} "
          f"({args.metric or 'all metrics'}): {args.reason}")
    print(f"  re-checked: {sum(bool(r['flagged']) for r in rows)} flagged for this key")
    write_json(args.json, {"run_id": run_id, "key": dict(zip(
        ("model", "variant", "device", "runtime"), key)), "metric": args.metric,
        "reason": args.reason, "verdicts": rows})
    return 0


ACTIONS = {"runs": _runs, "export": _export, "regressions": _regressions,
           "mark-intended": _mark}
