"""Reports: one run from the store as Markdown (`report.md`, plots beside it as PNG) and as a
self-contained HTML page (`report.html`, plots embedded as data URIs, inline CSS, no scripts),
so a nightly's report can be mailed or archived as one file.

Both are rendered from the same list of sections; a section without data says so in one line
instead of disappearing, so a missing power meter or search is visible, not silent.
Plots use matplotlib's Agg canvas through `Figure` (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hilq.stats import Stats

SECTIONS = ("Summary", "Latency distribution", "Accuracy on the device", "Accuracy vs latency",
            "Energy per inference", "Memory", "MLPerf scenarios (LoadGen)", "Batch sweep",
            "Sequence-length sweep",
            "Bit allocation", "Predicted vs measured latency",
            "Per-layer error of the searched configuration", "Nightly trends", "Regressions",
            "Devices and versions")
TREND_RUNS = 30
MAX_TREND_PANELS = 12


@dataclass
class Section:
    title: str
    # ("p", text) | ("alert", text) | ("table", head, rows) | ("img", name, png)
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return self.title.lower().replace(" ", "-")

    @property
    def has_data(self) -> bool:
        return any(b[0] not in ("p", "alert") for b in self.blocks)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def alert(self, text: str) -> None:
        """A result that missed its target: shown in red, first."""
        self.blocks.append(("alert", text))

    def table(self, head: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", head, rows))

    def img(self, name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96)
        self.blocks.append(("img", name, buf.getvalue()))


@dataclass(frozen=True)
class Report:
    run_id: str
    dir: Path
    markdown: Path
    html: Path
    sections: dict            # title -> has data
    plots: int
    flagged: int              # flagged verdicts (key x metric) in this run

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "dir": str(self.dir), "markdown": str(self.markdown),
                "html": str(self.html), "sections": self.sections, "plots": self.plots,
                "regressions_flagged": self.flagged}


# ------------------------------------------------------------------------ data


def mean_std(mean: float | None, std: float | None) -> str:
    """"mean ± std" with both at the mean's precision (3 significant digits of the mean):
    0.0763 ± 0.0041, not 0.0763 ± 0.2."""
    if mean is None or std is None or not math.isfinite(mean) or not math.isfinite(std):
        return f"{fmt(mean)} ± {fmt(std, 2)}"
    decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


@dataclass
class Result:
    """One (model, variant, device, runtime) of the run, its rounds pooled."""

    model: str
    variant: str
    device: str
    runtime: str
    rows: list

    @property
    def key(self) -> tuple:
        return (self.model, self.variant, self.device, self.runtime)

    @property
    def ok_rows(self) -> list:
        return [r for r in self.rows if r["status"] != "failed"]

    @property
    def status(self) -> str:
        statuses = {r["status"] for r in self.rows}
        for s in ("failed", "degraded"):
            if s in statuses:
                why = next(r["failure"] or r["reason"] for r in self.rows if r["status"] == s)
                return f"{s}: {why}" if why else s
        return "ok"

    @property
    def samples(self) -> np.ndarray:
        return np.asarray([x for r in self.ok_rows for x in (r["samples_ms"] or [])], float)

    def stat(self, name: str) -> float | None:
        s = self.samples
        if len(s) and name in ("p50", "p90", "p99", "mean", "std"):
            return getattr(Stats(s), name)               # devices/stats.py, as on the device
        vals = [r[f"{name}_ms"] for r in self.ok_rows if r.get(f"{name}_ms") is not None]
        return float(np.median(vals)) if vals else None

    @property
    def accuracy(self) -> dict:
        """The device's accuracy figures (the first round that measured them)."""
        return next((r["accuracy"] for r in self.ok_rows if r.get("accuracy")), {})

    def median_of(self, column: str) -> float | None:
        vals = [r[column] for r in self.ok_rows if r[column] is not None]
        return float(np.median(vals)) if vals else None

    @property
    def round_spread(self) -> float | None:
        """(max - min) / median of the per-round p50s: drift across alternating rounds."""
        p = [r["p50_ms"] for r in self.ok_rows if r["p50_ms"] is not None]
        if len(p) == 1:                   # rounds pooled into one row (runner): their own p50s
            p = [x for r in self.ok_rows for x in (r.get("rounds") or {}).get("p50_ms") or []]
        return (max(p) - min(p)) / float(np.median(p)) if len(p) > 1 else None


def _results(rows: list[dict]) -> list[Result]:
    groups: dict[tuple, Result] = {}
    for r in rows:
        key = (r["model"], r["variant"], r["device"], r["runtime"])
        groups.setdefault(key, Result(*key, rows=[])).rows.append(r)
    return list(groups.values())


def _bits(p) -> int:
    return p["bits"] if p else 32


# ------------------------------------------------------------------------ sections


def _summary(sec, run, results, acc, flagged) -> None:
    sec.p(f"Run `{run['id']}` — status **{run['status']}**, started {run['started']}, "
          f"ended {run['ended'] or '–'}, git {(run['git_sha'] or 'unknown')[:12]}, "
          f"config {run['config_hash'][:12]}, host {run['host']}, hilq {run['hilq_version']}.")
    if not results:
        sec.p("No measurements in this run.")
        return
    fp32 = {(r.model, r.device, r.runtime): r.stat("p50") for r in results
            if r.variant == "fp32"}
    rows = []
    for r in results:
        p50, ref = r.stat("p50"), fp32.get((r.model, r.device, r.runtime))
        energy = r.median_of("energy_j")
        rows.append([r.model, r.variant, r.device, r.runtime, r.status, len(r.rows),
                     fmt(p50), fmt(r.stat("p90")), fmt(r.stat("p99")),
                     mean_std(r.stat("mean"), r.stat("std")),
                     fmt(None if r.round_spread is None else 100 * r.round_spread, 2),
                     fmt(r.median_of("throughput")),
                     fmt(None if energy is None else 1000 * energy),
                     fmt(ref / p50 if ref and p50 else None),
                     _pct(r.accuracy.get("top1")),
                     _pct(r.accuracy.get("simulated_top1", acc.get((r.model, r.variant)))),
                     "REGRESSION" if r.key in flagged else ""])
    sec.table(["model", "variant", "device", "runtime", "status", "rounds", "p50 ms",
               "p90 ms", "p99 ms", "mean ± std ms", "round spread %", "throughput /s",
               "energy mJ", "speed-up vs fp32", "top-1 device %", "top-1 simulated %",
               "regression"], rows)


def _pct(x) -> str:
    return fmt(None if x is None else 100 * x, 4)


def _device_accuracy(sec, results, regs) -> None:
    """Accuracy measured by the engine on the device over the evaluation set, beside the
    fake-quant model's on the same set; the gap is what simulation does not see."""
    have = [r for r in results if r.accuracy]
    if not have:
        sec.p("No accuracy measured on a device in this run (no evaluation set).")
        return
    flagged = {(g["model"], g["variant"], g["device"], g["runtime"], g["metric"])
               for g in regs if g["flagged"]}
    rows, wide = [], []
    for r in have:
        a = r.accuracy
        gap = a.get("gap_top1") if a.get("gap_top1") is not None else a.get("gap_agreement")
        if gap is not None and abs(gap) > 0.005 and r.variant != "fp32":
            wide.append(f"{r.model} {r.variant} on {r.device}/{r.runtime}: "
                        f"{100 * gap:+.2f} pt")
        drop = sorted(g[-1] for g in flagged if g[:-1] == tuple(r.key)
                      and (g[-1] in ("top1", "agreement") or ":" in g[-1]))
        figures = ", ".join(f"{k} {v:.3f}" for group in ("task", "metric")
                            for k, v in (a.get(group) or {}).items() if isinstance(v, float))
        if a.get("metric_error"):
            figures = ", ".join(filter(None, [figures, f"metric failed: {a['metric_error']}"]))
        rows.append([r.model, r.variant, f"{r.device}/{r.runtime}", a.get("n"),
                     _pct(a.get("top1")), _pct(a.get("simulated_top1")),
                     fmt(None if a.get("gap_top1") is None else 100 * a["gap_top1"], 3),
                     _pct(a.get("agreement_fp32")), _pct(a.get("simulated_agreement_fp32")),
                     fmt(a.get("kl")), fmt(a.get("sqnr_db")), figures or "–",
                     ", ".join(map(str, (a.get("worst") or [])[:5])) or "–",
                     (a.get("eval_sha256") or "–")[:12],
                     "REGRESSION: " + ", ".join(drop) if drop else ""])
    if wide:
        sec.alert("Device accuracy differs from the simulation by more than 0.5 pt: "
                  + "; ".join(wide))
    sec.table(["model", "variant", "device/runtime", "n", "top-1 device %", "top-1 sim %",
               "gap pt", "agree device %", "agree sim %", "KL", "SQNR dB", "task / metric",
               "worst samples",
               "eval set", "regression"], rows)


def _searches(sec, allocs) -> None:
    """Each search's outcome at the top: a red alert when its pick missed the budget, and
    its iterations (pick predicted ± sd, measured ± CI, within budget or not)."""
    for a in (a for a in allocs if a["name"] == "chosen"):
        m, b = a["measured"] or {}, (a["budgets"] or {}).get("latency_ms")
        what = f"search {a['model']} on {a['device']}/{a['runtime']}"
        status = m.get("search_status", "ok")
        line = (f"{what}: {status.upper()}: budget {fmt(b)} ms, pick measured "
                f"{fmt(m.get('latency_ms'))} ± {fmt(m.get('latency_ci_ms'), 2)} ms after "
                f"{m.get('iterations', '?')} iteration(s)"
                + (f" ({m['message']})" if m.get("message") else ""))
        if status != "ok":
            sec.alert(line)
        else:
            sec.p(line)
        its = sorted((x for x in allocs if x["name"].startswith("iteration-") and
                      (x["model"], x["device"], x["runtime"]) ==
                      (a["model"], a["device"], a["runtime"])), key=lambda x: x["name"])
        # speed: the machine's in that batch relative to the budget's, from the uniforms
        # measured beside the pick; the error is judged at that speed (bench.loop)
        sec.table(["iteration", "predicted ms", "± sd", "margin ms", "measured ms", "± CI",
                   "speed", "error %", "unscaled error %", "budget ms", "within budget"],
                  [[x["name"].split("-", 1)[1], fmt(x["predicted"].get("latency_ms")),
                    fmt(x["predicted"].get("latency_sd_ms"), 2),
                    fmt(x["predicted"].get("margin_ms"), 2),
                    fmt((x["measured"] or {}).get("latency_ms")),
                    fmt((x["measured"] or {}).get("latency_ci_ms"), 2),
                    fmt((x["measured"] or {}).get("speed"), 3),
                    *(fmt(None if (x["measured"] or {}).get(k) is None
                          else 100 * x["measured"][k], 2)
                      for k in ("latency_error", "latency_error_unscaled")), fmt(b),
                    "yes" if (x["measured"] or {}).get("within_budget") else "MISSED"]
                   for x in its])


def _distribution(sec, results) -> None:
    from matplotlib.figure import Figure

    have = [r for r in results if len(r.samples)]
    if not have:
        sec.p("No raw latency samples in this run.")
        return
    # one panel per model, each on its own axis: 0.07 ms beside 25 ms would be a dot
    models = list(dict.fromkeys(r.model for r in have))
    fig = Figure(figsize=(9, 0.45 * len(have) + 1.2 * len(models) + 0.6), layout="constrained")
    heights = [sum(r.model == m for r in have) + 1 for m in models]
    axes = np.atleast_1d(fig.subplots(len(models), 1, height_ratios=heights, squeeze=False)
                         .ravel())
    for ax, model in zip(axes, models):
        mine = [r for r in have if r.model == model]
        ax.boxplot([r.samples for r in mine], orientation="horizontal",
                   tick_labels=[f"{r.variant} · {r.device}/{r.runtime}" for r in mine],
                   showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_title(model, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("latency per inference (ms)")
    fig.suptitle("Latency distribution (all rounds pooled), one axis per model")
    sec.img("latency_distribution", fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, accuracy) not beaten by a faster-and-at-least-as-accurate one."""
    front, best = [], -math.inf
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def _accuracy(sec, results, acc, allocs) -> None:
    from matplotlib.figure import Figure

    pts = [(r.stat("p50"), acc[(r.model, r.variant)], r.variant, "measured variant")
           for r in results if (r.model, r.variant) in acc and r.stat("p50") is not None]
    pts += [(a["measured"]["latency_ms"], a["accuracy"], a["name"], "searched config")
            for a in allocs if a["accuracy"] is not None
            and (a["measured"] or {}).get("latency_ms") is not None]
    if not pts:
        sec.p("No variant has both an accuracy and a measured latency in this run.")
        return
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for kind, marker in (("measured variant", "o"), ("searched config", "s")):
        sel = [p for p in pts if p[3] == kind]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, label=kind,
                       zorder=3)
    for lat, a, name, _ in pts:
        ax.annotate(name, (lat, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front([(p[0], p[1]) for p in pts])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
            label="Pareto frontier", zorder=2)
    ax.set_xlabel("measured latency p50 (ms)")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    sec.img("accuracy_vs_latency", fig)
    sec.table(["name", "kind", "p50 ms", "top-1", "on frontier"],
              [[n, k, fmt(lat), fmt(a, 4), "yes" if (lat, a) in front else ""]
               for lat, a, n, k in sorted(pts)])


def _energy(sec, results) -> None:
    from matplotlib.figure import Figure

    have = [(r, r.median_of("energy_j")) for r in results]
    have = [(r, e) for r, e in have if e is not None]
    if not have:
        sec.p("No energy measured in this run (no power meter on these devices).")
        return
    fig = Figure(figsize=(8, 0.4 * len(have) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.barh([f"{r.variant} · {r.device}/{r.runtime}" for r, _ in have],
            [1000 * e for _, e in have], color="tab:green")
    ax.set_xlabel("energy per inference (mJ)")
    ax.grid(axis="x", alpha=0.3)
    sec.img("energy", fig)
    sec.table(["variant", "device", "runtime", "energy mJ", "avg power W", "meter"],
              [[r.variant, r.device, r.runtime, fmt(1000 * e), fmt(r.median_of("avg_power_w")),
                (r.ok_rows[0]["power"] or {}).get("meter", "–")] for r, e in have])


def _having(results, field: str) -> list[tuple[Result, dict]]:
    """(result, its first round's `field`) for the results that have it: a Measurement field
    kept in the store's `extra` (memory, scenario)."""
    out = []
    for r in results:
        v = next(((x.get("extra") or {}).get(field) for x in r.ok_rows
                  if (x.get("extra") or {}).get(field)), None)
        if v:
            out.append((r, v))
    return out


def _memory(sec, results) -> None:
    have = _having(results, "memory")
    if not have:
        sec.p("No memory figures in this run (measured by agents before this version).")
        return
    sec.p("Peak resident memory of the agent process (MiB): while loading the artifact and in "
          "the timed window on its own (the peak is reset between phases), beside the "
          "artifact's size on disk. The engine's own figures where it reports them.")
    sec.table(["model", "variant", "device", "runtime", "artifact MiB", "load peak",
               "timed peak", "loading added", "engine"],
              [[r.model, r.variant, r.device, r.runtime, fmt(m.get("artifact_mb")),
                fmt(r.median_of("load_peak_mb")), fmt(r.median_of("timed_peak_mb")),
                fmt(m.get("load_delta_mb")), _kv(m.get("engine") or {}) or "–"]
               for r, m in have])


def _scenarios(sec, results) -> None:
    have = _having(results, "scenario")
    if not have:
        sec.p("No MLPerf scenario in this run (`--scenario`, or `scenario` in the protocol).")
        return
    sec.p("Each scenario run by MLPerf LoadGen in the same agent process, right after hilq's "
          "own single-stream timing of the same artifact; LoadGen's verdict is its own.")
    invalid = [(r, sc) for r, sc in have if not sc.get("valid")]
    for r, sc in invalid:
        sec.alert(f"INVALID: {r.model} {r.variant} on {r.device}/{r.runtime}, "
                  f"{sc.get('scenario')}: {'; '.join(sc.get('reasons') or ['no reason given'])}")
    rows = []
    for r, sc in have:
        own, lat = r.stat("p90"), sc.get("latency_ms") or {}
        agree = (f"{100 * (lat['p90'] - own) / own:+.1f}%" if own and lat.get("p90")
                 and sc.get("scenario") == "single-stream" else "–")
        value = sc.get("value")
        rows.append([r.model, r.variant, f"{r.device}/{r.runtime}", sc.get("scenario"),
                     sc.get("result"), sc.get("metric"),
                     fmt(value) + (" ms" if sc.get("unit") == "ms" else ""),
                     fmt(lat.get("p90")), fmt(own), agree, fmt(sc.get("qps")),
                     sc.get("query_count"), fmt(sc.get("early_stopping_ms")),
                     _mj((sc.get("energy") or {}).get("j_per_inference")),
                     _mj((sc.get("energy") or {}).get("dynamic_j_per_inference"))])
    sec.table(["model", "variant", "device", "scenario", "LoadGen", "metric", "value",
               "LoadGen p90 ms", "hilq p90 ms", "LoadGen vs hilq", "samples/s", "queries",
               "early-stop est. ms", "mJ/inf (run)", "mJ/inf above idle"], rows)


def _mj(j: float | None) -> str:
    return "–" if j is None else fmt(1000 * j)


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


@dataclass(frozen=True)
class SweepAxis:
    """One shape axis a bench can sweep (`--batch`, `--seq-len`): the protocol key that
    records each measurement's point, and the words its report section uses. `per_token`:
    work per call grows with the point (tokens = batch × length), so the section reports
    ms per token and tokens/s; otherwise ms per sample and samples/s."""

    key: str
    name: str
    flag: str
    png: str
    per_token: bool = False


BATCH = SweepAxis("batch", "batch", "--batch 1,8,32", "batch_sweep")
SEQ_LEN = SweepAxis("seq_len", "sequence length", "--seq-len 16,64,128", "seq_len_sweep",
                    per_token=True)


def _shape_of(r: Result) -> dict:
    """The measurement's shape point: its protocol's batch and sequence length (0: the
    model's own length, not swept)."""
    p = (r.ok_rows or r.rows)[0].get("protocol") or {}
    return {"batch": int(p.get("batch") or 1), "seq_len": int(p.get("seq_len") or 0)}


def _sweep_groups(results, axis: SweepAxis) -> dict[tuple, dict[int, Result]]:
    """(model, variant without its `@...` shape suffix, device, runtime, the other axes'
    points) -> {point on `axis`: result}; a product sweep gives one curve per other point."""
    groups: dict[tuple, dict[int, Result]] = {}
    for r in results:
        if r.ok_rows:
            shape = _shape_of(r)
            x = shape.pop(axis.key)
            key = (r.model, r.variant.split("@", 1)[0], r.device, r.runtime,
                   tuple(sorted(shape.items())))
            groups.setdefault(key, {})[x] = r
    return groups


def _curve(key: tuple) -> str:
    """A curve's variant, with the other axis when it was set: `w8a8`, `w8a8 b8`, `fp32 s64`."""
    rest = [f"{'b' if k == 'batch' else 's'}{v}" for k, v in key[4]
            if v and not (k == "batch" and v == 1)]
    return " ".join([key[1], *rest])


def _rate_of(axis: SweepAxis, x: int, r: Result) -> float | None:
    """Throughput in the section's unit: samples/s as measured, or tokens/s = sequences/s × x."""
    rate = r.median_of("throughput")
    return rate * x if axis.per_token and rate else rate


def _sweep_row(axis: SweepAxis, key: tuple, x: int, r: Result, fp32: Result | None) -> list:
    p50 = r.stat("p50")
    units = x * dict(key[4]).get("batch", 1) if axis.per_token else x   # per call
    gain = (f"{fp32.stat('p50') / p50:.2f}×" if fp32 is not None and key[1] != "fp32" and p50
            and fp32.stat("p50") else "–")
    return [key[0], _curve(key), f"{key[2]}/{key[3]}", x, fmt(p50),
            fmt(p50 / units if p50 else None), _rate(_rate_of(axis, x, r)), gain]


def _sweep(sec, results, axis: SweepAxis) -> None:
    """Latency and throughput against one shape axis, per variant, and INT8's speed-up over
    FP32 at each point, measured in the same run (`hilq bench --batch` / `--seq-len`)."""
    from matplotlib.figure import Figure

    groups = _sweep_groups(results, axis)
    swept = {k: v for k, v in groups.items() if len(v) > 1}
    if not swept:
        sec.p(f"No {axis.name} sweep in this run (`hilq bench {axis.flag}`).")
        return
    unit = "token" if axis.per_token else "sample"
    sec.p(f"Each {axis.name} measured in its own alternating rounds"
          + (", each length its own static-shape artifact" if axis.per_token else "")
          + f"; latency is per call, throughput is {unit}s/s over the timed window"
          + (" (sequences/s × length)." if axis.per_token else "."))
    rows = []
    for key, per in swept.items():
        fp32 = groups.get((key[0], "fp32", *key[2:]), {})
        rows += [_sweep_row(axis, key, x, r, fp32.get(x)) for x, r in sorted(per.items())]
    sec.table(["model", "variant", "device", axis.name, "p50 ms / call", f"ms / {unit}",
               f"{unit}s/s", f"× fp32 (same {axis.name})"], rows)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    lat, thr = fig.subplots(1, 2)
    for key, per in swept.items():
        xs = sorted(per)
        label = f"{key[0]} {_curve(key)} · {key[2]}/{key[3]}"
        lat.plot(xs, [per[x].stat("p50") for x in xs], "o-", label=label)
        thr.plot(xs, [_rate_of(axis, x, per[x]) for x in xs], "o-", label=label)
    for ax, name in ((lat, "p50 latency per call (ms)"), (thr, f"throughput ({unit}s/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis.name)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    thr.legend(fontsize=7)
    sec.img(axis.png, fig)


def _allocation(sec, allocs) -> None:
    from matplotlib.figure import Figure

    have = [a for a in allocs if a["config"]]
    if not have:
        sec.p("No searched configs in this run.")
        return
    sec.table(["name", "model", "device/runtime", "budgets", "predicted", "measured", "top-1"],
              [[a["name"], a["model"], f"{a['device']}/{a['runtime']}", _kv(a["budgets"]),
                _kv(a["predicted"]), _kv(a["measured"]), fmt(a["accuracy"], 4)] for a in have])
    for i, a in enumerate(have):
        layers = list(a["config"])
        w = [_bits(a["config"][n].get("weight")) for n in layers]
        x = [_bits(a["config"][n].get("act")) for n in layers]
        fig = Figure(figsize=(max(6, 0.35 * len(layers) + 2), 3.2), layout="constrained")
        ax = fig.subplots()
        idx = np.arange(len(layers))
        ax.bar(idx - 0.2, w, 0.4, label="weight bits")
        ax.bar(idx + 0.2, x, 0.4, label="activation bits")
        ax.set_xticks(idx, layers, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log", base=2)
        ax.set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32 (float)"])
        ax.set_title(f"{a['name']} ({a['model']} on {a['device']}/{a['runtime']})")
        ax.legend(fontsize=8)
        sec.img(f"allocation_{i}", fig)
    names = [_layer_names(a["config"]) for a in have]
    layers = list(dict.fromkeys(n for cfg in names for n in cfg))
    sec.table(["layer", *[a["name"] for a in have]],
              [[layer, *[cfg.get(layer, "–") for cfg in names]] for layer in layers])


def _debug(sec, allocs) -> None:
    """`hilq debug` of each searched configuration (the nightly runs it on the pick): the
    worst-first per-layer table and its plot, engine beside simulation."""
    from . import debug_report

    found = [(a, (a.get("measured") or {}).get("debug")) for a in allocs if a["name"] == "chosen"]
    found = [(a, d) for a, d in found if d and d.get("layers")]
    if not found:
        sec.p("No per-layer debug of a searched configuration in this run.")
        return
    for a, d in found:
        sec.p(f"{a['model']} on {a['device']}/{a['runtime']}, the chosen configuration "
              f"({d.get('n')} samples, status {d.get('status')}).")
        for line in debug_report.lines(d):
            sec.p(line)
        sec.table(debug_report.HEAD, debug_report.rows(d))
        sec.img(f"debug-{a['model']}-{a['device']}-{a['runtime']}", debug_report.figure(d))


def _layer_names(config: dict) -> dict[str, str]:
    """layer -> `w4a8`-style name, through `BitConfig` so the spelling is the project's."""
    from quant.spec import BitConfig, SpecError

    try:
        return BitConfig.from_dict(config).summary()
    except (SpecError, TypeError, KeyError) as e:
        return dict.fromkeys(config, f"unreadable ({e})")


def _kv(d) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in (d or {}).items()) or "–"


def _predicted(sec, allocs) -> None:
    from matplotlib.figure import Figure

    pts = [(a["name"], a["predicted"]["latency_ms"], a["measured"]["latency_ms"],
            a["predicted"].get("latency_sd_ms"))
           for a in allocs if (a["predicted"] or {}).get("latency_ms") is not None
           and (a["measured"] or {}).get("latency_ms") is not None]
    if not pts:
        sec.p("No searched config with both predicted and measured latency in this run.")
        return
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    # ±2σ of the latency model's prediction
    xerr = [2 * p[3] if p[3] else 0.0 for p in pts]
    ax.errorbar([p[1] for p in pts], [p[2] for p in pts], xerr=xerr, fmt="o", capsize=3,
                zorder=3, label="config (±2σ of the prediction)" if any(xerr) else "config")
    for n, pr, me, _ in pts:
        ax.annotate(n, (pr, me), textcoords="offset points", xytext=(4, 4), fontsize=8)
    # zoomed to the data: the errors that matter are a few percent of the latency
    lo = min(min(p[1] - e, p[2]) for p, e in zip(pts, xerr))
    hi = max(max(p[1] + e, p[2]) for p, e in zip(pts, xerr))
    pad = max(0.05 * (hi - lo), 0.01 * hi)
    lim = [lo - pad, hi + pad]
    ax.plot(lim, lim, "--", color="gray", label="predicted = measured")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("predicted latency (ms, from the fitted per-layer model)")
    ax.set_ylabel("measured latency (ms)")
    ax.legend()
    ax.grid(alpha=0.3)
    sec.img("predicted_vs_measured", fig)
    sec.table(["config", "predicted ms", "measured ms", "error % (pred − meas) / meas"],
              [[n, fmt(pr), fmt(me), fmt(100 * (pr / me - 1), 2)] for n, pr, me, _ in pts])


def _trends(sec, store, run_id, results) -> None:
    """p50 per run for every series, then device top-1 per run (on tonight's evaluation set)
    beside the simulated figure of tonight's artifact: the simulated-vs-device gap, nightly."""
    keys = [r.key for r in results if r.stat("p50") is not None][:MAX_TREND_PANELS]
    series = {k: store.history(*k, "p50", TREND_RUNS, through_run=run_id,
                               respect_resets=False) for k in keys}
    series = {k: h for k, h in series.items() if len(h) > 1}
    if not series:
        sec.p("No history yet: trends need at least two runs of the same variant.")
        return
    flagged = store.regressions(flagged_only=True)
    resets = {k: store.resets(*k) for k in series}
    sec.img("trends", _trend_figure(series, _flagged_runs(flagged, "p50"), resets, "p50 ms"))
    sec.p("Red circles: flagged regressions. Dashed lines: intended changes (baseline resets).")
    acc = {r.key: r.accuracy for r in results if r.accuracy and r.accuracy.get("top1") is not None}
    top1 = {k: [{**e, "value": 100 * e["value"]} for e in store.history(
                *k, "top1", TREND_RUNS, through_run=run_id, respect_resets=False,
                eval_sha256=a.get("eval_sha256"))]
            for k, a in list(acc.items())[:MAX_TREND_PANELS]}
    top1 = {k: h for k, h in top1.items() if len(h) > 1}
    if top1:
        sim = {k: 100 * acc[k]["simulated_top1"] for k in top1
               if acc[k].get("simulated_top1") is not None}
        sec.img("accuracy_trends", _trend_figure(top1, _flagged_runs(flagged, "top1"),
                                                 {k: resets.get(k, set()) for k in top1},
                                                 "top-1 on the device %", sim))
        sec.p("Device top-1 per run on the same evaluation set; the dotted line is the "
              "simulated (fake-quant) top-1 of tonight's artifact, so the distance between "
              "them is the simulated-vs-device gap.")


def _flagged_runs(regs: list[dict], metric: str) -> set[tuple]:
    return {(g["run_id"], g["model"], g["variant"], g["device"], g["runtime"])
            for g in regs if g["metric"] == metric}


def _trend_figure(series: dict, flagged: set, resets: dict, ylabel: str,
                  level: dict | None = None):
    """One panel per series: its value per run, flagged runs circled in red, baseline resets
    dashed, and `level[key]` (if given) as a dotted horizontal line."""
    from matplotlib.figure import Figure

    cols = 2 if len(series) > 1 else 1
    rows_n = math.ceil(len(series) / cols)
    fig = Figure(figsize=(6 * cols, 2.8 * rows_n), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False).ravel())
    for ax, (k, h) in zip(axes, series.items()):
        x = np.arange(len(h))
        ax.plot(x, [e["value"] for e in h], "o-", ms=3, label=ylabel.split(" ")[0])
        if level and k in level:
            ax.axhline(level[k], ls=":", color="tab:green", label="simulated")
        bad = [i for i, e in enumerate(h) if (e["run_id"], *k) in flagged]
        if bad:
            ax.scatter(bad, [h[i]["value"] for i in bad], s=90, facecolors="none",
                       edgecolors="red", linewidths=2, label="regression", zorder=4)
        for i, e in enumerate(h):
            if e["run_id"] in resets.get(k, ()):
                ax.axvline(i, ls="--", color="gray", lw=1)
        ax.set_xticks(x, [e["started"][5:16].replace("T", " ") for e in h], rotation=45,
                      ha="right", fontsize=7)
        ax.set_title(f"{k[1]} · {k[0]} · {k[2]}/{k[3]}", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if bad or (level and k in level):
            ax.legend(fontsize=7)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    return fig


def _regressions(sec, regs, detect: float | None = None) -> None:
    if not regs:
        sec.p("Regression detection has not been run for this run.")
        return
    regs = sorted(regs, key=lambda g: (not g["flagged"], g["model"], g["variant"]))
    n = sum(g["flagged"] for g in regs)
    sec.p(f"{n} of {len(regs)} comparisons flagged (rule: change ≥ threshold in the worse "
          "direction and Mann-Whitney U or lookback z-score significant).")
    sec.table(["flagged", "model", "variant", "device/runtime", "metric", "baseline",
               "current", "change %", "can see ≥ %", "p-value", "z", "history", "tests",
               "note"],
              [["YES" if g["flagged"] else "", g["model"], g["variant"],
                f"{g['device']}/{g['runtime']}", g["metric"], fmt(g["baseline"]),
                fmt(g["current"]), fmt(None if g["change"] is None else 100 * g["change"], 2),
                fmt(None if g.get("mde") is None else 100 * g["mde"], 2),
                fmt(g["p_value"], 2), fmt(g["z"], 2), g["n_history"], g["method"] or "–",
                g["note"]] for g in regs])
    blind = [g for g in regs if g.get("mde") is not None and detect is not None
             and g["mde"] > detect]
    if blind:
        sec.alert(f"{len(blind)} series cannot see a {detect:.0%} change tonight (noise too "
                  "high for the rounds the time budget allowed): " + ", ".join(
                      f"{g['model']} {g['variant']} {g['metric']} ≥ {100 * g['mde']:.1f}%"
                      for g in blind[:8]))


def _devices(sec, run, devs) -> None:
    versions = run["versions"] or {}
    sec.table(["run", "python and libraries"],
              [[run["id"], ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]])
    if not devs:
        sec.p("No device facts recorded in this run.")
        return
    for d in devs:
        facts = d["facts"] or {}
        sec.table([f"device {d['name']} ({d['id']})", "value"],
                  [[k, ", ".join(map(str, v)) if isinstance(v, list) else _kv(v)
                    if isinstance(v, dict) else fmt(v)] for k, v in sorted(facts.items())])


# ------------------------------------------------------------------------ output


def _markdown(run_id: str, sections: list[Section], plots: Path) -> str:
    out = [f"# hilq report — run {run_id}", ""]
    out += [f"- [{s.title}](#{s.anchor})" for s in sections] + [""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "alert":
                out += [f"> **⚠ {b[1]}**", ""]
            elif b[0] == "img":
                (plots / f"{b[1]}.png").write_bytes(b[2])
                out += [f"![{b[1]}](plots/{b[1]}.png)", ""]
            else:
                cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out += ["| " + " | ".join(cell(h) for h in b[1]) + " |",
                        "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in b[2]] + [""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.85rem;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;height:auto;display:block;margin:.8rem 0}
code{background:#f4f4f4;padding:0 .2rem}nav a{margin-right:1rem}
.bad{color:#b00;font-weight:bold}
.alert{color:#fff;background:#b00;padding:.6rem .8rem;font-weight:bold;border-radius:4px}"""


def _inline(text: str) -> str:
    """`code` and **bold** in our own one-line texts, everything else escaped."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _html(run_id: str, sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>hilq report {html.escape(run_id)}</title>", f"<style>{CSS}</style>",
           "</head><body>", f"<h1>hilq report — run {html.escape(run_id)}</h1>", "<nav>"]
    out += [f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections]
    out.append("</nav>")
    for s in sections:
        out.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "alert":
                out.append(f'<p class="alert">⚠ {_inline(b[1])}</p>')
            elif b[0] == "img":
                data = base64.b64encode(b[2]).decode()
                out.append(f'<img alt="{b[1]}" src="data:image/png;base64,{data}">')
            else:
                out.append("<table><thead><tr>" + "".join(
                    f"<th>{html.escape(str(h))}</th>" for h in b[1]) + "</tr></thead><tbody>")
                for row in b[2]:
                    out.append("<tr>" + "".join(
                        f'<td{" class=bad" if v in ("YES", "REGRESSION", "MISSED") else ""}>'
                        f"{html.escape(str(v))}</td>" for v in row) + "</tr>")
                out.append("</tbody></table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def render(store, run: str | None = "latest", out_dir: str | Path | None = None) -> Report:
    """Write `<out_dir>/report.md` (+ `plots/*.png`) and `<out_dir>/report.html` for a run
    (`latest` or an id); `out_dir` defaults to `reports/<run-id>/`."""
    run_id = store.resolve_run(run)
    run_row = store.run(run_id)
    rows = store.measurements(run_id)
    results = _results([r for r in rows if r["kind"] == "bench"] or rows)
    acc = {(a["model"], a["variant"]): a["top1"] for a in store.rows("accuracy", run_id)}
    allocs = store.rows("allocations", run_id)
    regs = store.regressions(run_id)
    flagged = {(g["model"], g["variant"], g["device"], g["runtime"]) for g in regs
               if g["flagged"]}
    dev_ids = {r["device_id"] for r in rows}
    devs = [d for d in store.rows("devices") if d["id"] in dev_ids]

    sections = [Section(t) for t in SECTIONS]
    s = dict(zip(SECTIONS, sections))
    _searches(s["Summary"], allocs)
    _summary(s["Summary"], run_row, results, acc, flagged)
    _distribution(s["Latency distribution"], results)
    _device_accuracy(s["Accuracy on the device"], results, regs)
    _accuracy(s["Accuracy vs latency"], results, acc, allocs)
    _energy(s["Energy per inference"], results)
    _memory(s["Memory"], results)
    _scenarios(s["MLPerf scenarios (LoadGen)"], results)
    _sweep(s["Batch sweep"], results, BATCH)
    _sweep(s["Sequence-length sweep"], results, SEQ_LEN)
    _allocation(s["Bit allocation"], allocs)
    _predicted(s["Predicted vs measured latency"], allocs)
    _debug(s["Per-layer error of the searched configuration"], allocs)
    _trends(s["Nightly trends"], store, run_id, results)
    _regressions(s["Regressions"], regs, (run_row.get("config") or {}).get("detect"))
    _devices(s["Devices and versions"], run_row, devs)

    out = Path(out_dir) if out_dir else Path("reports") / run_id
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(_markdown(run_id, sections, plots))
    page = out / "report.html"
    page.write_text(_html(run_id, sections))
    return Report(run_id, out, md, page, {x.title: x.has_data for x in sections},
                  sum(b[0] == "img" for x in sections for b in x.blocks),
                  sum(bool(g["flagged"]) for g in regs))
