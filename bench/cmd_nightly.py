"""`hilq nightly`: the whole loop from a config (default `configs/nightly-local.toml`: local
CPU, ONNX Runtime, SQLite, built-in models). Exit 1 on failures, 4 when a search's pick
missed its latency budget (`budget_missed`), 3 on regressions with `--fail-on-regression`;
a killed run started again resumes without duplicates."""

from __future__ import annotations

from dataclasses import replace

from .errors import UserError
from .output import Output, write_json


def add_arguments(p):
    p.add_argument("--config", help="nightly TOML (default: configs/nightly-local.toml)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 3 when a regression is flagged")
    p.add_argument("--db", help="results store (SQLite path or database URL); overrides the config")
    p.add_argument("--reports", help="report root directory; overrides the config")
    p.add_argument("--inventory", help="devices.toml; overrides the config")
    p.add_argument("--no-report", action="store_true", help="skip rendering the report")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the summary as JSON")
    p.add_argument("--engine", choices=("thread", "ray"),
                   help="where the work runs: this process (thread, the default) or a Ray "
                        "cluster (ray: each device an exclusive resource on its node)")
    p.add_argument("--ray-address", help="the Ray cluster to join ('auto': the one this "
                   "machine belongs to; default: start a local instance)")
    p.add_argument("--resume", metavar="RUN",
                   help="reopen this run and measure only what it is missing")


def run(args) -> int:
    from hilq.bench import config
    from hilq.bench.nightly import run_nightly
    from rich.table import Table

    cfg = config.load(args.config)
    overrides = {k: v for k, v in (("db", args.db), ("reports", args.reports),
                                   ("inventory", args.inventory), ("engine", args.engine),
                                   ("ray_address", args.ray_address)) if v}
    cfg = replace(cfg, **overrides)
    if args.resume:
        from hilq.bench.store import open_store

        with open_store(cfg.db) as store:
            if store.run(args.resume) is None:
                raise UserError(f"--resume {args.resume!r}: no such run in {store.name}")
    out = Output.of(args)
    planned = sum(len(b.devices) * len(b.runtimes) * len(b.variants) for b in cfg.bench)
    with out.progress("nightly", planned * cfg.rounds or None):
        res = run_nightly(cfg, say=out.say, report=not args.no_report, resume=args.resume)
    console = out.out
    t = Table(title=f"hilq nightly {res.run_id}")
    for col in ("model", "variant", "device", "runtime", "status", "p50 ms", "cv(p50)"):
        t.add_column(col, justify="right" if col in ("p50 ms", "cv(p50)") else "left")
    for r in res.measurements:
        t.add_row(r["model"], r["variant"], r["device"], r["runtime"], r["status"],
                  f"{r['p50_ms']:.3f}" if r["p50_ms"] is not None else "-",
                  f"{r['cv_p50']:.1%}" if r["cv_p50"] is not None else "-")
    console.print(t)
    for s in res.searches:
        if s.get("status") in ("ok", "budget_missed", "resumed"):
            p, m = s.get("predicted") or {}, s.get("measured") or {}
            missed = "budget_missed" in (s.get("status"), s.get("search_status"))
            console.print(f"search {s['model']} on {s['device']}/{s['runtime']}: "
                          + ("[bold red]BUDGET MISSED[/bold red] " if missed else "")
                          + f"budget {_budgets(s.get('resolved_budgets') or s.get('budgets'))}, "
                          f"predicted {p.get('latency_ms') or float('nan'):.3f} ms, "
                          f"measured {m.get('latency_ms') or float('nan'):.3f} ms"
                          + (f": {s['message']}" if s.get("message") else ""))
    for what, why in res.failures:
        console.print(f"[red]failed[/red] {what}: {why}")
    for r in res.regressions:
        console.print(f"[yellow]regression[/yellow] {r.get('model')} {r.get('variant')} "
                      f"{r.get('device')}/{r.get('runtime')} {r.get('metric')}: "
                      f"{r.get('change', 0):+.1%}")
    if res.report:
        console.print(f"report: {res.report}")
    console.print(f"{res.status} in {res.seconds:.0f} s")
    write_json(args.json_out, res.to_dict())
    if res.failures:
        return 1
    if res.status == "budget_missed":
        return 4
    if res.regressions and args.fail_on_regression:
        return 3
    return 0


def _budgets(budgets: dict | None) -> str:
    """`latency_ms 5.477` rather than a dict's repr with 16 digits."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in (budgets or {}).items()) or "-"
