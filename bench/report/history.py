"""Section builders for the run in its history: nightly trends, regression verdicts, and the
devices and library versions that produced the numbers."""

from __future__ import annotations

from . import plots
from .data import RunData
from .model import Plot, Table, Text, fmt, fmt_p, kv


def trends(d: RunData) -> list:
    """p50 per run for every series, then device top-1 per run (on tonight's evaluation set)
    beside the simulated figure of tonight's artifact: the simulated-vs-device gap, nightly."""
    h = d.history
    if not h.p50:
        return [Text("No history yet: trends need at least two runs of the same variant.")]
    out = [Plot("trends", plots.png(plots.trends(h.p50, _flagged_runs(h.flagged, "p50"),
                                                 h.resets, "p50 ms"))),
           Text("Red circles: flagged regressions. Dashed lines: intended changes (baseline "
                "resets).")]
    if not h.top1:
        return out
    acc = {r.key: r.accuracy for r in d.results if r.key in h.top1}
    sim = {k: 100 * acc[k]["simulated_top1"] for k in h.top1
           if acc[k].get("simulated_top1") is not None}
    fig = plots.trends(h.top1, _flagged_runs(h.flagged, "top1"),
                       {k: h.resets.get(k, set()) for k in h.top1}, "top-1 on the device %", sim)
    return out + [Plot("accuracy_trends", plots.png(fig)),
                  Text("Device top-1 per run on the same evaluation set; the dotted line is "
                       "the simulated (fake-quant) top-1 of tonight's artifact, so the "
                       "distance between them is the simulated-vs-device gap.")]


def _flagged_runs(regs: list[dict], metric: str) -> set[tuple]:
    return {(g["run_id"], g["model"], g["variant"], g["device"], g["runtime"])
            for g in regs if g["metric"] == metric}


def regressions(d: RunData) -> list:
    if not d.regs:
        return [Text("Regression detection has not been run for this run.")]
    fresh = [g for g in d.regs if not g["n_history"]]
    regs = sorted((g for g in d.regs if g["n_history"]),
                  key=lambda g: (not g["flagged"], g["model"], g["variant"]))
    n = sum(g["flagged"] for g in regs)
    out = [Text(f"{n} of {len(regs)} comparisons flagged (rule: change ≥ threshold in the "
                "worse direction and Mann-Whitney U or lookback z-score significant; "
                "accuracy: the exact McNemar test on the samples that changed)." + (
                    f" {len(fresh)} series have no history yet (first run on this device, "
                    "runtime and evaluation set): nothing to compare." if fresh else ""))]
    if not regs:
        return out
    out.append(Table(
        ["flagged", "model", "variant", "device/runtime", "metric", "baseline", "current",
         "change %", "can see ≥ %", "p-value", "z", "history", "tests", "note"],
        [["YES" if g["flagged"] else "", g["model"], g["variant"],
          f"{g['device']}/{g['runtime']}", g["metric"], fmt(g["baseline"]), fmt(g["current"]),
          fmt(None if g["change"] is None else 100 * g["change"], 2),
          fmt(None if g.get("mde") is None else 100 * g["mde"], 2), fmt_p(g["p_value"]),
          fmt(g["z"], 2), g["n_history"], g["method"] or "–", g["note"]] for g in regs]))
    detect = (d.run.get("config") or {}).get("detect")
    blind = [g for g in regs if g.get("mde") is not None and detect is not None
             and g["mde"] > detect]
    if blind:
        out.append(Text(f"{len(blind)} series cannot see a {detect:.0%} change tonight (noise "
                        "too high for the rounds the time budget allowed): " + ", ".join(
                            f"{g['model']} {g['variant']} {g['metric']} ≥ {100 * g['mde']:.1f}%"
                            for g in blind[:8]), alert=True))
    return out


def devices(d: RunData) -> list:
    versions = d.run["versions"] or {}
    out = [Table(["run", "python and libraries"],
                 [[d.run["id"], ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]])]
    if not d.devs:
        return out + [Text("No device facts recorded in this run.")]
    return out + [Table([f"device {x['name']} ({x['id']})", "value"],
                        [[k, ", ".join(map(str, v)) if isinstance(v, list) else kv(v)
                          if isinstance(v, dict) else fmt(v)]
                         for k, v in sorted((x["facts"] or {}).items())])
                  for x in d.devs]
