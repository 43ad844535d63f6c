"""MLPerf scenarios through LoadGen beside hilq's own timing, and the agent's memory beside
the artifact's size (issue: scenarios, memory).

    python -m experiments.scenarios_memory [--db .cache/scenarios.sqlite] [--min-s 3]

1. `resnet18` FP32 and W8A8 on ORT and OpenVINO under SingleStream, Server (at half the
   single-stream rate, then 0.35× and 0.25× until LoadGen finds it VALID) and Offline: LoadGen's verdict and metric, and its p90
   beside hilq's own p90 of the same agent process. Then one Server run at 3× the
   single-stream rate, which the device cannot carry: INVALID, with LoadGen's reasons.
2. Peak resident memory of the agent, loading and timed, for `resnet18` and
   `tiny-transformer` (FP32, W8A8, and W4A16 weight-only), against the file sizes.
3. A batch sweep 1/8/32 of W8A8 vs FP32 on OpenVINO (the report's *Batch sweep* plot).
Everything goes into one results store (`hilq report --db DB` renders it). Run it alone on a
quiet machine; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from hilq.bench.report import render
from hilq.bench.runner import artifact_for, bench_variants, combine, measure_artifacts
from hilq.bench.store import open_store
from hilq.devices.local import LocalDevice

from experiments.closed_loop_real import cpu
from hilq.measurement import Protocol

ROOT = Path(__file__).resolve().parents[1]

SERVER_SHARES = (0.5, 0.35, 0.25)    # of the single-stream rate, tried in turn until VALID


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default=str(ROOT / ".cache" / "scenarios.sqlite"))
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "scenarios")
    ap.add_argument("--min-s", type=float, default=3.0)
    ap.add_argument("--only", choices=("scenarios",), help="part 1 alone")
    args = ap.parse_args()
    print(f"CPU: {cpu()}\n")
    store = open_store(args.db)
    run_id = store.begin_run({"command": "scenarios_memory"}, seed=0)
    dev = LocalDevice(workdir=str(args.work / "device"))
    base = Protocol(warmup_iters=10, warmup_s=1.0, min_iters=50, min_duration_s=args.min_s,
                    max_duration_s=120, idle_s=0.05)
    rows, mem = [], []

    def one(model, variant, runtime, protocol, label):
        art = artifact_for(model, variant, args.work / "art", runtime, calib_data="real")
        per = measure_artifacts(dev, runtime, model, {label: art}, protocol, rounds=1,
                                store=store, run_id=run_id, kind="bench",
                                on_result=lambda s: print("  " + s, flush=True))
        return combine(per[label]), art

    def row(runtime, variant, label, m):
        s = m.scenario or {}
        rows.append((runtime, variant, label, s.get("result"), s.get("metric"), s.get("value"),
                     (s.get("latency_ms") or {}).get("p90"), (m.latency_ms or {}).get("p90"),
                     s.get("qps"), s.get("query_count"),
                     "; ".join(s.get("reasons") or []) or m.reason))
        return s

    for runtime in ("ort", "openvino"):
        for variant in ("fp32", "w8a8"):
            m, art = one("resnet18", variant, runtime, replace(base, scenario="single-stream"),
                         f"{variant}-single-stream")
            row(runtime, variant, "single-stream", m)
            rate = 1000.0 / m.latency_ms["p50"]
            for share in SERVER_SHARES:     # down from half the single-stream rate to VALID
                qps = round(share * rate, 1)
                m, _ = one("resnet18", variant, runtime,
                           replace(base, scenario="server", target_qps=qps),
                           f"{variant}-server-{qps:g}")
                if row(runtime, variant, f"server @ {qps:g}/s", m).get("valid"):
                    break
            m, _ = one("resnet18", variant, runtime, replace(base, scenario="offline"),
                       f"{variant}-offline")
            row(runtime, variant, "offline", m)
            if variant == "w8a8":         # a rate the device cannot carry: INVALID
                m, _ = one("resnet18", variant, runtime,
                           replace(base, scenario="server", target_qps=round(3 * rate, 1)),
                           f"{variant}-server-3x")
                row(runtime, variant, f"server @ {3 * rate:.0f}/s (3×)", m)
    if args.only == "scenarios":
        store.finish_run(run_id, "ok")
        _print_scenarios(rows)
        return 0
    quick = replace(base, min_duration_s=1.0)
    for model, variants in (("resnet18", ("fp32", "w8a8")),
                            ("tiny-transformer", ("fp32", "w8a8", "w4a16"))):
        for variant in variants:
            m, art = one(model, variant, "ort", quick, f"{variant}-memory")
            mm = m.memory or {}
            mem.append((model, variant, mm.get("artifact_mb"), mm.get("rss_start_mb"),
                        mm.get("load_peak_mb"), mm.get("load_delta_mb"), mm.get("timed_peak_mb"),
                        mm.get("peak_rss_mb")))
    sweep = []
    for b in (1, 8, 32):      # 3. W8A8 vs FP32 on OpenVINO against batch, side by side
        ms = bench_variants("resnet18", ["fp32", "w8a8"], dev, "openvino",
                            replace(quick, batch=b, min_iters=20), rounds=2, store=store,
                            run_id=run_id, label=f"@b{b}", out_dir=str(args.work / "art"))
        f, q = (m.latency_ms.get("p50") for m in ms)
        sweep.append((b, f, q, ms[0].throughput, ms[1].throughput))
        print(f"  batch {b}: fp32 {f:.2f} ms, w8a8 {q:.2f} ms, {f / q:.2f}×", flush=True)
    store.finish_run(run_id, "ok")
    rep = render(store, run_id, args.work / "report")
    print(f"\nrun {run_id} in {store.name}; report {rep.markdown}\n")
    print("| batch (OpenVINO) | fp32 ms/batch | w8a8 ms/batch | fp32 samples/s | "
          "w8a8 samples/s | w8a8 × fp32 |")
    print("|---|---|---|---|---|---|")
    for b, f, q, tf, tq in sweep:
        print(f"| {b} | {f:.2f} | {q:.2f} | {tf:.1f} | {tq:.1f} | {f / q:.2f}× |")
    print()
    _print_scenarios(rows)
    print("\n| model | variant (ORT) | file MiB | RSS at start | load peak | loading added | "
          "timed peak | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in mem:
        print("| " + " | ".join([r[0], r[1], *(_f(x) for x in r[2:])]) + " |")
    return 0


def _print_scenarios(rows) -> None:
    """LoadGen's verdicts; its p90 beside hilq's own only for SingleStream (a Server p90 adds
    queueing, an Offline one is the whole batch: neither is the same quantity)."""
    print("| runtime | variant | scenario | LoadGen | metric | value | LoadGen p90 ms | "
          "hilq p90 ms | LoadGen vs hilq | samples/s | queries | reasons |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = r[2] == "single-stream" and r[6] and r[7]
        agree = f"{100 * (r[6] - r[7]) / r[7]:+.1f}%" if same else "–"
        lg_p90 = _f(r[6]) if r[2] != "offline" else "–"
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {_f(r[5])} | {lg_p90} | "
              f"{_f(r[7])} | {agree} | {_f(r[8])} | {r[9]} | {r[10] or ''} |")
    print()


def _f(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) and x < 10 else f"{x:.1f}" if isinstance(
        x, float) else "–" if x is None else str(x)


if __name__ == "__main__":
    sys.exit(main())
