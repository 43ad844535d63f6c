"""`hilq search`: hardware-aware bit allocation with per-layer costs measured on the device,
the ILP under the budgets, and the chosen configuration built and re-measured there."""

from __future__ import annotations

import json

from bench.cli import UserError

_COLUMNS = ("latency_ms", "energy_mj", "size_bits")


def _budget(text: str) -> tuple[str, float | str]:
    key, sep, value = text.partition("=")
    if not sep or key not in _COLUMNS:
        raise UserError(f"--budget {text!r}: expected COLUMN=VALUE with COLUMN one of "
                        f"{', '.join(_COLUMNS)} (VALUE a number or 'NN%')")
    if value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            raise UserError(f"--budget {text!r}: {value!r} is not a percentage") from None
        if not 0 <= pct <= 100:
            raise UserError(f"--budget {text!r}: percentages run from 0% to 100%")
        return key, value
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"--budget {text!r}: {value!r} is not a number") from None
    if v <= 0:
        raise UserError(f"--budget {text!r}: must be positive")
    return key, v


def add_arguments(p):
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="local")
    p.add_argument("--runtime", default="ort")
    p.add_argument("--inventory", help="devices.toml (not needed for --device local)")
    p.add_argument("--budget", action="append", default=[], metavar="COL=VALUE",
                   help="latency_ms=4.2, energy_mj=..., size_bits=...; 'NN%%' = that share of "
                        "the way from the smallest achievable to the all-float total; repeatable")
    p.add_argument("--sensitivity", choices=("kl", "hessian"), default="kl")
    p.add_argument("--calib-data", choices=("real", "distilled", "noise"), default="real")
    p.add_argument("--sweep", choices=_COLUMNS, help="also measure a frontier along this column")
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-duration-s", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--remeasure", action="store_true",
                   help="measure the cost table again even if the store has one")
    p.add_argument("--db", help="results store (default results/hilq.sqlite)")
    p.add_argument("--work-dir", default="results/artifacts/search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", metavar="OUT")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.search import run_search
    from bench.store import open_store
    from devices import inventory
    from devices.measurement import Protocol

    budgets = dict(_budget(b) for b in args.budget)
    if not budgets:
        raise UserError("give at least one --budget, e.g. --budget latency_ms=4.2")
    if args.sweep and args.points < 2:
        raise UserError("--points must be at least 2 with --sweep")
    device = inventory.open_device(args.device, inventory.load(args.inventory))
    protocol = Protocol(min_duration_s=args.min_duration_s, threads=args.threads, seed=args.seed)
    console = Console(highlight=False)
    store = open_store(args.db)
    try:
        run_id = store.begin_run({"command": "search", "model": args.model, "device": args.device,
                                  "runtime": args.runtime, "budgets": budgets,
                                  "sensitivity": args.sensitivity, "calib_data": args.calib_data,
                                  "sweep": args.sweep, "points": args.points}, seed=args.seed)
        res = run_search(args.model, device, args.runtime, budgets, protocol=protocol,
                         work_dir=args.work_dir, store=store, run_id=run_id,
                         sensitivity=args.sensitivity, calib_data=args.calib_data,
                         rounds=args.rounds, sweep=args.sweep,
                         points=args.points if args.sweep else 0,
                         reuse_costs=not args.remeasure, seed=args.seed,
                         progress=lambda s: console.print(f"[dim]{s}[/dim]"))
        store.finish_run(run_id, "ok" if res.status == "optimal" else "failed")
    finally:
        store.close()
        device.close()
    if res.status != "optimal":
        console.print(f"[red]{res.status}[/red]: {res.message}")
    else:
        t = Table(title=f"{args.model} on {args.device}/{args.runtime}")
        t.add_column("layer")
        t.add_column("precision")
        for layer, prec in res.config.items():
            t.add_row(layer, prec)
        console.print(t)
        rows = [("chosen", res.predicted, res.measured, res.accuracy)] + \
               [(p["name"], p["predicted"], p["measured"], p["accuracy"]) for p in res.frontier]
        s = Table(title="predicted vs measured")
        for col in ("config", "pred ms", "meas ms", "error", "accuracy"):
            s.add_column(col)
        for name, p, m, a in rows:
            err = m.get("latency_error")
            s.add_row(name, f"{p.get('latency_ms', float('nan')):.3f}",
                      f"{m.get('latency_ms', float('nan')):.3f}",
                      f"{err:+.1%}" if err is not None else "-",
                      ", ".join(f"{k} {v:.2%}" for k, v in a.items()))
        for label, b in res.baseline.items():
            s.add_row(f"{label} ({b['variant']})", "-", f"{b['latency_ms'] or float('nan'):.3f}",
                      "-", ", ".join(f"{k} {v:.2%}" for k, v in b["accuracy"].items()))
        console.print(s)
        console.print(f"budgets: {res.resolved_budgets}; config file: {res.variant}")
        if res.cost_noise_ms is not None:
            console.print(f"cost table noise: the baseline's repeats spread ±{res.cost_noise_ms:.3f} "
                          f"ms; per-layer differences below ~{2 * res.cost_noise_ms:.3f} ms are "
                          "not resolved")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res.to_dict(), fh, indent=2, default=str)
    return 0 if res.status == "optimal" else 1
