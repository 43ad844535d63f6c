"""The closed loop on real engines: searches at several budgets, and the profile-based model
beside the switch-one Δ model on the same held-out configurations.

    python -m experiments.closed_loop_real [--models resnet18,mobilenet_v2] [--runtimes ort,openvino]
        [--budgets 25,50,75] [--heldout 6] [--rounds 2] [--db .cache/closed-loop.sqlite]

Per (model, runtime), on the local CPU, with one results store:
1. `hilq search` at each budget (history accumulates across them, as on consecutive nights):
   the pick, predicted ± sd, measured ± CI, within budget, iterations;
2. held-out configurations (seeded random mixes) timed beside the uniforms, predicted by
   the profile model fitted on the profile patterns alone and by the Δ model (each layer
   switched to float alone, the all-INT8 baseline repeated; `bench.deltas`).
Run it alone on a quiet machine. Prints Markdown tables; `--json` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from hilq.bench import latmodel, runner, search, search_context
from hilq.bench.latmodel import FLOAT, INT8
from hilq.bench.store import open_store
from hilq.devices.local import LocalDevice

from experiments import deltas
from hilq.measurement import Protocol

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    get = lambda k: next((ln.split(":", 1)[1].strip() for ln in info.splitlines()  # noqa: E731
                          if ln.startswith(k)), "?")
    flags = set(get("flags").split())
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{get('model name')}, family {get('cpu family')} model {get('model')}, {' '.join(keep)}"


def searches(model, runtime, budgets, args, store, device, protocol, log) -> list[dict]:
    out = []
    for b in budgets:
        run_id = store.begin_run({"command": "closed_loop_real", "model": model,
                                  "runtime": runtime, "budget": b}, seed=0)
        t0 = time.perf_counter()
        options = search.SearchOptions({"latency_ms": f"{b}%"}, calib_data=args.calib,
                                       samples=8, distill_iters=30, rounds=args.rounds)
        res = search.run_search(model, device, runtime, options, protocol=protocol,
                                work_dir=args.work / "search", store=store, run_id=run_id,
                                progress=log)
        store.finish_run(run_id, res.status)
        m, p = res.measured, res.predicted
        out.append({"budget": f"{b}%", "budget_ms": res.resolved_budgets.get("latency_ms"),
                    "status": res.status, "float_layers": sum(v != INT8 for v in res.config.values()),
                    "pred_ms": p.get("latency_ms"), "sd_ms": p.get("latency_sd_ms"),
                    "meas_ms": m.get("latency_ms"), "ci_ms": m.get("latency_ci_ms"),
                    "error": m.get("latency_error"), "speed": m.get("speed"),
                    "unscaled_error": m.get("latency_error_unscaled"),
                    "iterations": len(res.iterations),
                    "int8_ms": res.baseline["fastest"]["latency_ms"], "seconds":
                    time.perf_counter() - t0, "message": res.message,
                    "loo": [r["error"] for r in res.loo]})
    return out


def heldout(model, runtime, args, store, device, protocol, log) -> dict:
    """Both models predicting the same held-out mixes, measured beside the uniforms."""
    from hilq.quant.models import load_model
    from hilq.quant.transform import fold_bn, quantizable_layers

    folded = fold_bn(load_model(model).build().eval())
    layers = quantizable_layers(folded)
    run_id = store.begin_run({"command": "closed_loop_real/heldout", "model": model,
                              "runtime": runtime}, seed=0)
    ctx = search_context.Context(
        model=model, entry=load_model(model), folded=folded, layers=layers,
        edges=search_context.float_edges(folded, layers), device=device, runtime=runtime,
        protocol=protocol, work=args.work / "heldout", store=store, run_id=run_id,
        rounds=args.rounds, seed=0, progress=log)
    ctx.work.mkdir(parents=True, exist_ok=True)
    seeded, prior = search_context.measure_patterns(ctx)
    profile_model = latmodel.fit(layers, ctx.edges, prior, latmodel.observations(seeded))
    # the Δ model: each layer float alone, the baseline repeated, one round each
    q = dict.fromkeys(layers, INT8)
    switched = {f"float-{lay}": {**q, lay: FLOAT} for lay in layers}
    order = deltas.with_baselines(list(switched) + ["uniform-" + FLOAT],
                                   "uniform-" + INT8)
    cfgs = {n: switched.get(deltas.base_name(n)) or (
        q if deltas.base_name(n) == "uniform-" + INT8 else dict.fromkeys(layers, FLOAT))
        for n in order}
    arts = {n: ctx.artifact(c) for n, c in cfgs.items()}
    log(f"{model}/{runtime}: Δ table, {len(order)} timings")
    ms = runner.measure_artifacts(device, runtime, model, arts, protocol, rounds=1, store=store,
                                  run_id=run_id, kind="cost", on_result=log)
    p50 = {n: search_context.median_p50(ms[n]) for n in order}
    base = deltas.interpolated_baseline(order, p50, "uniform-" + INT8)
    reps = [p50[n] for n in order if deltas.base_name(n) == "uniform-" + INT8 and p50[n]]
    b0 = statistics.median(reps)
    delta = {lay: p50[f"float-{lay}"] - base[f"float-{lay}"] for lay in layers}
    all_float = b0 + p50["uniform-" + FLOAT] - base["uniform-" + FLOAT]
    beta = (sum(delta.values()) - (all_float - b0)) / max(1, len(ctx.edges))

    def delta_model(cfg):
        fl = [lay for lay in layers if cfg[lay] != INT8]
        ff = sum(1 for a, b in ctx.edges if cfg[a] != INT8 and cfg[b] != INT8)
        return b0 + sum(delta[lay] for lay in fl) - beta * ff

    rng = random.Random(7)
    mixes = {}
    for k in range(args.heldout):
        share = rng.uniform(0.2, 0.8)
        mixes[f"heldout-{k}"] = {lay: FLOAT if rng.random() < share else INT8 for lay in layers}
    got = ctx.measure({**mixes, "uniform-" + INT8: q})
    rows = []
    scale = 1.0
    if got.get("uniform-" + INT8):   # both models on the held-out batch's own scale
        scale = statistics.median(got["uniform-" + INT8]) / statistics.median(
            seeded["uniform-" + INT8][1])
    for n, cfg in mixes.items():
        if not got.get(n):
            continue
        meas = statistics.median(got[n])
        pm, sd = profile_model.predict(cfg)
        rows.append({"config": n, "float_layers": sum(v != INT8 for v in cfg.values()),
                     "meas_ms": meas, "profile_ms": pm * scale, "profile_sd_ms": sd,
                     "delta_ms": delta_model(cfg) * scale})
    store.finish_run(run_id, "ok")
    return {"rows": rows, "noise_ms": statistics.stdev(reps) if len(reps) > 1 else None,
            "drift_scale": scale}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--budgets", default="25,50,75", help='"" for the held-out part alone')
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--min-s", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the engine")
    ap.add_argument("--calib", default="distilled")
    ap.add_argument("--skip-heldout", action="store_true")
    ap.add_argument("--db", default=str(ROOT / ".cache" / "closed-loop.sqlite"))
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "closed-loop")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    protocol = Protocol(min_duration_s=args.min_s, threads=args.threads)
    device = LocalDevice("local")
    store = open_store(args.db)
    out = {"cpu": cpu(), "cases": []}
    print(f"CPU: {out['cpu']}\n")
    log = lambda s: print(f"  {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        for model in args.models.split(","):
            for runtime in args.runtimes.split(","):
                t0 = time.perf_counter()
                case = {"model": model, "runtime": runtime,
                        "searches": searches(model, runtime,
                                             [b for b in args.budgets.split(",") if b], args,
                                             store, device, protocol, log)}
                if not args.skip_heldout:
                    case["heldout"] = heldout(model, runtime, args, store, device, protocol, log)
                case["seconds"] = time.perf_counter() - t0
                out["cases"].append(case)
                report(case)
    finally:
        store.close()
        device.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def report(case: dict) -> None:
    print(f"### {case['model']} on {case['runtime']} ({case['seconds']:.0f} s)\n")
    print("| budget | ms | status | float layers | pred ± sd | meas ± CI | speed | error "
          "| unscaled | iters | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    for s in case["searches"]:
        print(f"| {s['budget']} | {f(s['budget_ms'])} | {s['status']} | {s['float_layers']} | "
              f"{f(s['pred_ms'])} ± {f(s['sd_ms'])} | {f(s['meas_ms'])} ± {f(s['ci_ms'])} | "
              f"{f(s.get('speed'))} | {pct(s['error'])} | {pct(s.get('unscaled_error'))} | "
              f"{s['iterations']} | {s['seconds']:.0f} |")
    h = case.get("heldout")
    if h and h["rows"]:
        print(f"\nheld-out ({len(h['rows'])} mixes; Δ table baseline noise "
              f"{f(h['noise_ms'])} ms):\n")
        print("| config | float layers | measured | profile model | error | Δ model | error |")
        print("|---|---|---|---|---|---|---|")
        pe, de = [], []
        for r in h["rows"]:
            e1 = (r["profile_ms"] - r["meas_ms"]) / r["meas_ms"]
            e2 = (r["delta_ms"] - r["meas_ms"]) / r["meas_ms"]
            pe.append(abs(e1))
            de.append(abs(e2))
            print(f"| {r['config']} | {r['float_layers']} | {f(r['meas_ms'])} | "
                  f"{f(r['profile_ms'])} | {100 * e1:+.1f}% | {f(r['delta_ms'])} | {100 * e2:+.1f}% |")
        print(f"\n|error| median/max: profile model {100 * statistics.median(pe):.1f}% / "
              f"{100 * max(pe):.1f}%, Δ model {100 * statistics.median(de):.1f}% / "
              f"{100 * max(de):.1f}%\n")


if __name__ == "__main__":
    sys.exit(main())
