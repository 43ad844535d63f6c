"""Section builders for what was measured in the run: the summary table, latency, accuracy,
energy, memory and LoadGen scenarios. Each takes the run's data and returns its blocks."""

from __future__ import annotations

import math

from . import plots
from .data import RunData
from .model import Plot, Table, Text, fmt, kv, mean_std, mj, pct
from .searches import outcomes


def glance(d: RunData) -> list:
    """The first screen: the run's status, what regressed (with its evidence), each search's
    verdict and what else needs attention — or that nothing does."""
    run = d.run
    n_ok = sum(1 for r in d.results if r.status == "ok")
    out = [Text(f"**{run['status'].upper()}** — {len(d.results)} series measured, {n_ok} ok; "
                f"git {(run['git_sha'] or 'unknown')[:12]}, host {run['host']}.",
                alert=run["status"] not in ("ok", "running"))]
    red = [f"regressed: {g['model']} {g['variant']} on {g['device']}/{g['runtime']} "
           f"{g['metric']} {fmt(None if g['change'] is None else 100 * g['change'], 2)}% "
           f"({g['note']})" for g in d.regs if g["flagged"]]
    for a in (a for a in d.allocs if a["name"] == "chosen"):
        m = a["measured"] or {}
        status = m.get("search_status", "ok")
        if status != "ok":          # an ok search's outcome follows the first screen
            red.append(f"search {a['model']} on {a['device']}/{a['runtime']}: "
                       f"{status.upper()}, pick measured {fmt(m.get('latency_ms'))} ms")
    for r in d.results:
        if r.status != "ok":
            red.append(f"{r.model} {r.variant} on {r.device}/{r.runtime}: {r.status}")
        sc = r.having("scenario")
        if sc and not sc.get("valid"):
            red.append(f"{r.model} {r.variant} on {r.device}/{r.runtime}: LoadGen "
                       f"{sc.get('scenario')} INVALID ({'; '.join(sc.get('reasons') or [])})")
        gap = _sim_gap(r, r.accuracy) if r.accuracy else None
        if gap and gap[0]:
            red.append(f"accuracy on the device differs from the simulation: {gap[1]}")
    out += [Text("Needs attention: " + line, alert=True) for line in red[:8]]
    if len(red) > 8:
        out.append(Text(f"… and {len(red) - 8} more below.", alert=True))
    if not red:
        out.append(Text("Nothing needs attention: no regression, no missed budget, no "
                        "failure."))
    return out


def summary(d: RunData) -> list:
    """The first screen (`glance`), the searches' outcomes (a missed budget in red), then
    one row per result."""
    run, out = d.run, glance(d) + outcomes(d.allocs)
    out.append(Text(
        f"Run `{run['id']}` — status **{run['status']}**, started {run['started']}, "
        f"ended {run['ended'] or '–'}, git {(run['git_sha'] or 'unknown')[:12]}, "
        f"config {run['config_hash'][:12]}, host {run['host']}, hilq {run['hilq_version']}."))
    if not d.results:
        return out + [Text("No measurements in this run.")]
    fp32 = {(r.model, r.device, r.runtime): r.stat("p50") for r in d.results
            if r.variant == "fp32"}
    rows = []
    for r in d.results:
        p50, ref = r.stat("p50"), fp32.get((r.model, r.device, r.runtime))
        energy = r.median_of("energy_j")
        rows.append([r.model, r.variant, r.device, r.runtime, r.status, len(r.rows),
                     fmt(p50), fmt(r.stat("p90")), fmt(r.stat("p99")),
                     mean_std(r.stat("mean"), r.stat("std")),
                     fmt(None if r.round_spread is None else 100 * r.round_spread, 2),
                     fmt(r.median_of("throughput")),
                     fmt(None if energy is None else 1000 * energy),
                     fmt(ref / p50 if ref and p50 else None),
                     pct(r.accuracy.get("top1")),
                     pct(r.accuracy.get("simulated_top1", d.acc.get((r.model, r.variant)))),
                     "REGRESSION" if r.key in d.flagged else ""])
    return out + [Table(["model", "variant", "device", "runtime", "status", "rounds", "p50 ms",
                         "p90 ms", "p99 ms", "mean ± std ms", "round spread %",
                         "throughput /s", "energy mJ", "speed-up vs fp32", "top-1 device %",
                         "top-1 simulated %", "regression"], rows)]


def distribution(d: RunData) -> list:
    have = [r for r in d.results if len(r.samples)]
    if not have:
        return [Text("No raw latency samples in this run.")]
    return [Plot("latency_distribution", plots.png(plots.distribution(have)))]


def device_accuracy(d: RunData) -> list:
    """Accuracy measured by the engine on the device over the evaluation set, beside the
    fake-quant model's on the same set; the gap is what simulation does not see."""
    have = [r for r in d.results if r.accuracy]
    if not have:
        return [Text("No accuracy measured on a device in this run (no evaluation set).")]
    flagged = {(g["model"], g["variant"], g["device"], g["runtime"], g["metric"])
               for g in d.regs if g["flagged"]}
    rows, wide, unsure = [], [], []
    for r in have:
        a = r.accuracy
        line = _sim_gap(r, a)
        if line:
            (wide if line[0] else unsure).append(line[1])
        drop = sorted(g[-1] for g in flagged if g[:-1] == tuple(r.key)
                      and (g[-1] in ("top1", "agreement") or ":" in g[-1]))
        rows.append([r.model, r.variant, f"{r.device}/{r.runtime}", a.get("n"),
                     pct(a.get("top1")), pct(a.get("simulated_top1")),
                     fmt(None if a.get("gap_top1") is None else 100 * a["gap_top1"], 3),
                     pct(a.get("agreement_fp32")), pct(a.get("simulated_agreement_fp32")),
                     fmt(a.get("kl")), fmt(a.get("sqnr_db")), _figures(a),
                     ", ".join(map(str, (a.get("worst") or [])[:5])) or "–",
                     (a.get("eval_sha256") or "–")[:12],
                     "REGRESSION: " + ", ".join(drop) if drop else ""])
    out = [Text("Device accuracy differs from the simulation (paired on the same samples, "
                "exact McNemar test): " + "; ".join(wide), alert=True)] if wide else []
    if unsure:
        out.append(Text("Device and simulation differ, but the samples cannot tell whether "
                        "the engine is worse: " + "; ".join(unsure)))
    return out + [Table(["model", "variant", "device/runtime", "n", "top-1 device %",
                         "top-1 sim %", "gap pt", "agree device %", "agree sim %", "KL",
                         "SQNR dB", "task / metric", "worst samples", "eval set",
                         "regression"], rows)]


def _sim_gap(r, a: dict) -> tuple[bool, str] | None:
    """(red, line) for a quantized variant whose device figure differs from the simulated
    one: red only when the paired test on the samples can see it (`bench.evidence`)."""
    from ..evidence import Paired

    for k, gap_key in (("top1", "gap_top1"), ("agreement_fp32", "gap_agreement")):
        gap = a.get(gap_key)
        if gap is None:
            continue
        if gap == 0 or r.variant == "fp32":
            return None
        test = a.get(f"paired_{k}")
        where = f"{r.model} {r.variant} on {r.device}/{r.runtime}: {k} {100 * gap:+.2f} pt"
        if not test:
            return (False, f"{where} (no per-sample results stored to test it)") \
                if abs(gap) > 0.005 else None
        p = Paired(**{f: test[f] for f in ("n", "only_first", "only_second", "p",
                                           "decidable")})
        return p.significant, f"{where} ({p.says()})"
    return None


def _figures(a: dict) -> str:
    """The task's own figures (mAP, F1, ...) and a metric that failed, or a dash."""
    figures = ", ".join(f"{k} {v:.3f}" for group in ("task", "metric")
                        for k, v in (a.get(group) or {}).items() if isinstance(v, float))
    if a.get("metric_error"):
        figures = ", ".join(filter(None, [figures, f"metric failed: {a['metric_error']}"]))
    return figures or "–"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, accuracy) not beaten by a faster-and-at-least-as-accurate one."""
    front, best = [], -math.inf
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def accuracy_vs_latency(d: RunData) -> list:
    pts = [(r.stat("p50"), d.acc[(r.model, r.variant)], r.variant, "measured variant")
           for r in d.results if (r.model, r.variant) in d.acc and r.stat("p50") is not None]
    pts += [(a["measured"]["latency_ms"], a["accuracy"], a["name"], "searched config")
            for a in d.allocs if a["accuracy"] is not None
            and (a["measured"] or {}).get("latency_ms") is not None]
    if not pts:
        return [Text("No variant has both an accuracy and a measured latency in this run.")]
    front = pareto_front([(p[0], p[1]) for p in pts])
    return [Plot("accuracy_vs_latency", plots.png(plots.accuracy_vs_latency(pts, front))),
            Table(["name", "kind", "p50 ms", "top-1", "on frontier"],
                  [[n, k, fmt(lat), fmt(a, 4), "yes" if (lat, a) in front else ""]
                   for lat, a, n, k in sorted(pts)])]


def energy(d: RunData) -> list:
    have = [(r, r.median_of("energy_j")) for r in d.results]
    have = [(r, e) for r, e in have if e is not None]
    if not have:
        return [Text("No energy measured in this run (no power meter on these devices).")]
    fig = plots.energy([f"{r.variant} · {r.device}/{r.runtime}" for r, _ in have],
                       [1000 * e for _, e in have])
    return [Plot("energy", plots.png(fig)),
            Table(["variant", "device", "runtime", "energy mJ", "avg power W", "meter"],
                  [[r.variant, r.device, r.runtime, fmt(1000 * e),
                    fmt(r.median_of("avg_power_w")),
                    (r.ok_rows[0]["power"] or {}).get("meter", "–")] for r, e in have])]


def memory(d: RunData) -> list:
    have = [(r, m) for r in d.results if (m := r.having("memory"))]
    if not have:
        return [Text("No memory figures in this run (measured by agents before this version).")]
    return [Text("Peak resident memory of the agent process (MiB): while loading the artifact "
                 "and in the timed window on its own (the peak is reset between phases), "
                 "beside the artifact's size on disk. The engine's own figures where it "
                 "reports them."),
            Table(["model", "variant", "device", "runtime", "artifact MiB", "load peak",
                   "timed peak", "loading added", "engine"],
                  [[r.model, r.variant, r.device, r.runtime, fmt(m.get("artifact_mb")),
                    fmt(r.median_of("load_peak_mb")), fmt(r.median_of("timed_peak_mb")),
                    fmt(m.get("load_delta_mb")), kv(m.get("engine") or {}) or "–"]
                   for r, m in have])]


def scenarios(d: RunData) -> list:
    have = [(r, sc) for r in d.results if (sc := r.having("scenario"))]
    if not have:
        return [Text("No MLPerf scenario in this run (`--scenario`, or `scenario` in the "
                     "protocol).")]
    out = [Text("Each scenario run by MLPerf LoadGen in the same agent process, right after "
                "hilq's own single-stream timing of the same artifact; LoadGen's verdict is "
                "its own.")]
    out += [Text(f"INVALID: {r.model} {r.variant} on {r.device}/{r.runtime}, "
                 f"{sc.get('scenario')}: {'; '.join(sc.get('reasons') or ['no reason given'])}",
                 alert=True) for r, sc in have if not sc.get("valid")]
    return out + [Table(["model", "variant", "device", "scenario", "LoadGen", "metric",
                         "value", "LoadGen p90 ms", "hilq p90 ms", "LoadGen vs hilq",
                         "samples/s", "queries", "early-stop est. ms", "mJ/inf (run)",
                         "mJ/inf above idle"], [_scenario_row(r, sc) for r, sc in have])]


def _scenario_row(r, sc: dict) -> list:
    own, lat = r.stat("p90"), sc.get("latency_ms") or {}
    agree = (f"{100 * (lat['p90'] - own) / own:+.1f}%" if own and lat.get("p90")
             and sc.get("scenario") == "single-stream" else "–")
    energy = sc.get("energy") or {}
    return [r.model, r.variant, f"{r.device}/{r.runtime}", sc.get("scenario"),
            sc.get("result"), sc.get("metric"),
            fmt(sc.get("value")) + (" ms" if sc.get("unit") == "ms" else ""),
            fmt(lat.get("p90")), fmt(own), agree, fmt(sc.get("qps")), sc.get("query_count"),
            fmt(sc.get("early_stopping_ms")), mj(energy.get("j_per_inference")),
            mj(energy.get("dynamic_j_per_inference"))]
