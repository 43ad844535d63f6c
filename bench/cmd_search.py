"""`hilq search`: hardware-aware bit allocation: the engine's per-layer profile and every
whole-network timing fitted into a latency model, the ILP under the budget minus a margin,
the pick re-measured on the device until it holds (bench.search, bench.loop).

Exit 0: the pick meets the budget as measured; 4: `budget_missed` (every pick missed it);
2: the budget was refused (below anything measured or predicted with confidence) or bad
input; 1: the search failed on the device."""

from __future__ import annotations

import statistics

from hilq.bench.cli import add_model_arguments, defaults, model_ref
from hilq.bench.cli import console as cli_console
from hilq.bench.errors import UserError
from hilq.quant.spec import CALIB_DATA, SENSITIVITIES

from .output import Output, write_json

EXIT = {"ok": 0, "failed": 1, "infeasible": 2, "budget_missed": 4}


def _budget(text: str) -> tuple[str, float | str]:
    from .loop import BUDGETS, parse_budget

    key, sep, value = text.partition("=")
    if not sep or key not in BUDGETS:
        raise UserError(f"--budget {text!r}: expected COLUMN=VALUE with COLUMN one of "
                        f"{', '.join(BUDGETS)} (VALUE a number or 'NN%')")
    try:
        return key, parse_budget(key, value)
    except ValueError as e:
        raise UserError(f"--budget {text!r}: {e}") from None


def _max_drop(text: str) -> tuple[str, float]:
    """`top1=0.5` (points), or `NAME=X` for a task figure or a --metric's figure (its own
    units) -> (name, value)."""
    key, sep, value = text.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not key.strip() or not sep or v < 0:
        raise UserError(f"--max-drop {text!r}: expected NAME=DROP, e.g. top1=0.5 (points) or "
                        "map_iou=0.02 (a figure the model reports, in its own units)")
    return key.strip(), v


def add_arguments(p):
    from .loop import CONFIDENCE
    from .search import SearchOptions

    d = defaults(SearchOptions)
    add_model_arguments(p)
    p.add_argument("--device", default="local")
    p.add_argument("--runtime", default="ort")
    p.add_argument("--inventory", help="devices.toml (not needed for --device local)")
    p.add_argument("--budget", action="append", default=[], metavar="COL=VALUE",
                   help="latency_ms=4.2 or latency_ms=50%% (that share of the way from the "
                        "measured all-INT8 to the all-float latency), size_bits=...; repeatable")
    p.add_argument("--max-drop", metavar="NAME=DROP",
                   help="instead of a latency budget: the fastest configuration losing at most "
                        "this much against float, measured: top1=POINTS, or a figure the model "
                        "reports in its own units (map_iou, detection_map50, "
                        "sequence_agreement, or a --metric name)")
    p.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="instead of a latency budget: the fastest configuration agreeing with "
                        "float's predictions on at least this fraction of the test inputs")
    p.add_argument("--sweep", type=int, default=d["sweep"], metavar="N",
                   help="also measure N picks from 0%% to 100%% of the latency range: the "
                        "latency-vs-accuracy frontier")
    p.add_argument("--sensitivity", choices=SENSITIVITIES, default=d["sensitivity"])
    p.add_argument("--calib-data", choices=CALIB_DATA, default=d["calib_data"])
    p.add_argument("--samples", type=int, default=d["samples"],
                   help=f"calibration inputs for the sensitivity (default {d['samples']})")
    p.add_argument("--distill-iters", type=int, default=d["distill_iters"],
                   help=f"ZeroQ iterations with --calib-data distilled (default "
                        f"{d['distill_iters']})")
    p.add_argument("--rounds", type=int, default=d["rounds"])
    p.add_argument("--min-duration-s", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--confidence", type=float, default=CONFIDENCE,
                   help="one-sided confidence that the pick's prediction meets the budget")
    p.add_argument("--tolerance", type=float, default=d["tolerance"],
                   help="|predicted - measured| / measured above which the model is refitted")
    p.add_argument("--max-iters", type=int, default=d["max_iters"],
                   help="re-measure/refit iterations")
    p.add_argument("--no-history", action="store_true",
                   help="fit tonight's measurements only, not the store's earlier ones")
    p.add_argument("--db", help="results store (default results/hilq.sqlite)")
    p.add_argument("--work-dir", default="results/artifacts/search")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--json", dest="json_out", metavar="OUT")
    p.add_argument("--replay", action="store_true",
                   help="no device: refit the latency model on the searches stored in --db "
                        "for this model, device and runtime, and print how well each pick "
                        "was predicted from what was measured before it")


def _accuracy(acc: dict) -> str:
    """Fractions as percentages; the device's SQNR in dB, KL and the sample count as they are;
    task figures and the user's metric by name, as they are (the limit is in their units)."""
    def one(k, v):
        if k.endswith("sqnr_db"):
            return f"{k} {v:.1f} dB"
        if k.endswith("_n") or k.endswith("kl"):
            return f"{k} {v:.4g}"
        return f"{k} {v:.2%}"
    named = {**(acc.get("task") or {}), **(acc.get("metric") or {})}
    return ", ".join([one(k, v) for k, v in acc.items() if isinstance(v, (int, float))]
                     + [f"{k} {v:.4g}" for k, v in named.items() if isinstance(v, (int, float))])


def replay(args) -> int:
    """`--replay`: the stored searches through the latency model, offline."""
    from hilq.bench import replay as rp
    from hilq.bench.search import float_edges
    from hilq.bench.store import open_store
    from hilq.quant.models import load_model
    from hilq.quant.transform import fold_bn, quantizable_layers

    folded = fold_bn(load_model(model_ref(args)).build().eval())
    layers = quantizable_layers(folded)
    store = open_store(args.db)
    try:
        runs = rp.nights(store, args.model, args.device, args.runtime, layers)
    finally:
        store.close()
    console = cli_console(highlight=False)
    console.print(f"{args.model} on {args.device}/{args.runtime}: {len(runs)} stored search(es)")
    out = {}
    for scaled in (False, True):
        rows = rp.summary(rp.replay(layers, float_edges(folded, layers), runs, scaled))
        out["on_one_scale" if scaled else "as_read"] = rows
        for r in rows:
            console.print(f"{'on one scale' if scaled else 'as read':>12}  {r['kind']:<8} "
                          f"n {r['n']:<3} median |error| {r['median_abs']:.1%}  "
                          f"max {r['max_abs']:.1%}  median {r['median']:+.1%}")
    write_json(args.json_out, {"runs": len(runs), **out})
    return 0


def run(args) -> int:
    if args.replay:
        return replay(args)
    from hilq.bench.search import SearchOptions, run_search
    from hilq.bench.store import open_store
    from hilq.devices import inventory
    from hilq.quant.models import load_model

    from hilq.measurement import Protocol

    budgets = dict(_budget(b) for b in args.budget)
    drop_metric, max_drop = _max_drop(args.max_drop) if args.max_drop else ("top1", None)
    from hilq.accuracy import TASK_FIGURES

    if drop_metric not in ("top1", *TASK_FIGURES) and not args.metric:
        raise UserError(f"--max-drop {args.max_drop!r}: no figure named {drop_metric!r} "
                        f"without --metric (use top1=POINTS, a task figure such as "
                        f"map_iou=0.02, or a name your --metric returns)")
    if not 0.5 <= args.confidence < 1:
        raise UserError(f"--confidence {args.confidence}: give a value in [0.5, 1)")
    options = SearchOptions(budgets, max_drop=max_drop, drop_metric=drop_metric,
                            min_agreement=args.min_agreement,
                            sensitivity=args.sensitivity, calib_data=args.calib_data,
                            samples=args.samples, distill_iters=args.distill_iters,
                            rounds=args.rounds, reuse_costs=not args.no_history,
                            seed=args.seed, z=statistics.NormalDist().inv_cdf(args.confidence),
                            tolerance=args.tolerance, max_iters=args.max_iters,
                            sweep=args.sweep)       # checks itself: one line, exit 2
    load_model(model_ref(args))      # a bad model or data door fails before the device opens
    device = inventory.open_device(args.device, inventory.load(args.inventory))
    protocol = Protocol(min_duration_s=args.min_duration_s, threads=args.threads, seed=args.seed)
    out = Output.of(args)
    store = open_store(args.db)
    run_id = None
    try:
        run_id = store.begin_run({"command": "search", "model": args.model, "device": args.device,
                                  "runtime": args.runtime, "budgets": budgets,
                                  "sensitivity": args.sensitivity, "calib_data": args.calib_data,
                                  "confidence": args.confidence, "tolerance": args.tolerance,
                                  "max_iters": args.max_iters}, seed=args.seed)
        with out.progress("search", None):
            res = run_search(model_ref(args), device, args.runtime, options, protocol=protocol,
                             work_dir=args.work_dir, store=store, run_id=run_id,
                             progress=out.say)
        store.finish_run(run_id, res.status if res.status in ("ok", "budget_missed") else "failed")
    except KeyboardInterrupt:      # Ctrl-C, SIGTERM: what is stored stays; the run says so
        if run_id is not None:
            store.finish_run(run_id, "interrupted")
        raise
    finally:
        store.close()
        device.close()
    show(out.out, res, f"{args.model} on {args.device}/{args.runtime}")
    write_json(args.json_out, res.to_dict())
    if res.status == "infeasible":
        raise UserError(f"budget refused: {res.message}")
    return EXIT.get(res.status, 1)


def show(console, res, title: str) -> None:
    """The search's outcome: status first (red when missed), the iterations, the pick."""
    if res.status in ("failed", "infeasible"):
        if res.status == "failed":
            console.print(f"[red]failed[/red]: {res.message}")
        return
    colour = "green" if res.status == "ok" else "bold red"
    console.print(f"[{colour}]{res.status.upper()}[/{colour}] {title}: budget "
                  f"{res.resolved_budgets['latency_ms']:.3f} ms"
                  + (f"; {res.message}" if res.message else ""))
    console.print(_table(
        "iterations (pick re-measured beside the uniforms; speed: the machine's, from them, "
        "relative to the budget's; error at that speed)",
        ("#", "float layers", "pred ms", "± sd", "margin", "meas ms", "± CI", "speed",
         "error", "budget"),
        [(str(s["index"]), _floats(s["config"]), f"{s['predicted_ms']:.3f}",
          f"{s['predicted_sd_ms']:.3f}", f"{s['margin_ms']:.3f}", _f(s["measured_ms"]),
          _f(s["measured_ci_ms"]), f"{s.get('speed', 1.0):.3f}",
          f"{s['error']:+.1%}" if s["error"] is not None else "-",
          "ok" if s["within_budget"] else "[red]missed[/red]") for s in res.iterations],
        justify="right"))
    if not res.config:
        return
    console.print(_table("chosen configuration", ("layer", "precision"), res.config.items()))
    console.print(_table("measured beside the uniforms", ("config", "latency ms", "accuracy"), [
        ("chosen", _f(res.measured.get("latency_ms")), _accuracy(res.accuracy)),
        *((f"{label} ({b['variant']})", _f(b["latency_ms"]), _accuracy(b["accuracy"]))
          for label, b in res.baseline.items())]))
    if res.accuracy_checks:
        console.print(_table(
            "accuracy checked along the latency range",
            ("budget %", "float layers", "accuracy", "within limit"),
            [(f"{c['budget_pct']:.1f}", str(c["float_layers"]), _accuracy(c["accuracy"]),
              "yes" if c["within_limit"] else "no") for c in res.accuracy_checks]))
    if res.frontier:
        console.print(_table(
            "latency-vs-accuracy frontier (measured)",
            ("point", "float layers", "pred ms", "meas ms", "accuracy"),
            [(p["name"], _floats(p["config"]), _f(p["predicted"].get("latency_ms")),
              _f(p["measured"].get("latency_ms")), _accuracy(p["accuracy"]))
             for p in res.frontier]))
    if res.loo:
        errs = sorted(abs(r["error"]) for r in res.loo)
        console.print(f"latency model ({res.prior} prior, {len(res.loo)} measurements): "
                      f"leave-one-out |error| median {errs[len(errs) // 2]:.1%}, "
                      f"max {errs[-1]:.1%}; config file: {res.variant}")


def _table(title: str, columns, rows, justify: str = "left"):
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify=justify)
    for row in rows:
        t.add_row(*row)
    return t


def _floats(config: dict) -> str:
    """How many layers a configuration leaves float (anything but all-INT8's precision)."""
    from .latmodel import INT8

    return str(sum(v != INT8 for v in config.values()))


def _f(v) -> str:
    return f"{v:.3f}" if v is not None else "-"
