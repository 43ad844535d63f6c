"""The report's figures, each from plain values the section builders computed, so the builders
hold no drawing code. matplotlib's Agg canvas through `Figure`: no pyplot, no global backend
switch, and matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import io
import math

import numpy as np

# per-layer error: (result key, label, line style, colour), engine beside fake-quant
LAYER_SERIES = (("sqnr_db", "engine", "o-", "#1f77b4"),
                ("sqnr_db_simulated", "fake-quant", "s--", "#ff7f0e"),
                ("own_error_db", "own error (engine)", "v:", "#2ca02c"),
                ("own_error_db_simulated", "own error (fake-quant)", "^:", "#98df8a"))


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kw)


def png(fig) -> bytes:
    """PNG bytes at the one resolution every report plot uses."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def distribution(have: list):
    """Box plots of the raw samples, one panel per model, each on its own axis: 0.07 ms
    beside 25 ms would be a dot."""
    models = list(dict.fromkeys(r.model for r in have))
    fig = _figure(figsize=(9, 0.45 * len(have) + 1.2 * len(models) + 0.6))
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
        _latency_axis(ax, np.concatenate([r.samples for r in mine]))
    axes[-1].set_xlabel("latency per inference (ms)")
    fig.suptitle("Latency distribution (all rounds pooled), one axis per model")
    return fig


def _latency_axis(ax, samples: np.ndarray) -> None:
    """A log axis where the samples span more than a decade (a 0.05 ms model's rare 4 ms
    outlier would otherwise squeeze its whole box into one pixel); linear otherwise."""
    lo, hi = float(np.min(samples)), float(np.max(samples))
    if lo > 0 and hi / lo > 10:
        ax.set_xscale("log")


def accuracy_vs_latency(pts: list, front: list):
    """`pts`: (latency, accuracy, name, kind); `front`: the Pareto front, drawn as a step."""
    fig = _figure(figsize=(8, 5))
    ax = fig.subplots()
    for kind, marker in (("measured variant", "o"), ("searched config", "s")):
        sel = [p for p in pts if p[3] == kind]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, label=kind,
                       zorder=3)
    for lat, a, name, _ in pts:
        ax.annotate(name, (lat, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
            label="Pareto frontier", zorder=2)
    ax.set_xlabel("measured latency p50 (ms)")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def energy(labels: list[str], mj: list[float]):
    fig = _figure(figsize=(8, 0.4 * len(labels) + 1.5))
    ax = fig.subplots()
    ax.barh(labels, mj, color="tab:green")
    ax.set_xlabel("energy per inference (mJ)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def sweep(curves: list, axis_name: str, unit: str):
    """`curves`: (label, points, p50 per point, throughput per point); log2 x axis."""
    fig = _figure(figsize=(9, 3.6))
    lat, thr = fig.subplots(1, 2)
    for label, xs, p50, rate in curves:
        lat.plot(xs, p50, "o-", label=label)
        thr.plot(xs, rate, "o-", label=label)
    for ax, name in ((lat, "p50 latency per call (ms)"), (thr, f"throughput ({unit}s/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis_name)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    thr.legend(fontsize=7)
    return fig


def allocation(a: dict):
    """Weight and activation bits per layer of one searched config (32: float)."""
    layers = list(a["config"])
    w = [_bits(a["config"][n].get("weight")) for n in layers]
    x = [_bits(a["config"][n].get("act")) for n in layers]
    fig = _figure(figsize=(max(6, 0.35 * len(layers) + 2), 3.2))
    ax = fig.subplots()
    idx = np.arange(len(layers))
    ax.bar(idx - 0.2, w, 0.4, label="weight bits")
    ax.bar(idx + 0.2, x, 0.4, label="activation bits")
    ax.set_xticks(idx, layers, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log", base=2)
    ax.set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32 (float)"])
    ax.set_title(f"{a['name']} ({a['model']} on {a['device']}/{a['runtime']})")
    ax.legend(fontsize=8)
    return fig


def _bits(spec: dict | None) -> int:
    return spec["bits"] if spec else 32


def predicted(pts: list):
    """`pts`: (name, predicted, measured, sd of the prediction), around the diagonal and
    zoomed to the data: the errors that matter are a few percent of the latency."""
    fig = _figure(figsize=(5.5, 5))
    ax = fig.subplots()
    xerr = [2 * p[3] if p[3] else 0.0 for p in pts]           # ±2σ of the prediction
    ax.errorbar([p[1] for p in pts], [p[2] for p in pts], xerr=xerr, fmt="o", capsize=3,
                zorder=3, label="config (±2σ of the prediction)" if any(xerr) else "config")
    for n, pr, me, _ in pts:
        ax.annotate(n, (pr, me), textcoords="offset points", xytext=(4, 4), fontsize=8)
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
    return fig


def trends(series: dict, flagged: set, resets: dict, ylabel: str, level: dict | None = None):
    """One panel per series: its value per run, flagged runs circled in red, baseline resets
    dashed, and `level[key]` (if given) as a dotted horizontal line."""
    cols = 2 if len(series) > 1 else 1
    rows_n = math.ceil(len(series) / cols)
    fig = _figure(figsize=(6 * cols, 2.8 * rows_n))
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


def layer_error(result: dict, title: str):
    """`hilq debug`'s per-layer SQNR (engine, fake-quant) and own error in graph order (layers
    left to right as data flows), so where the SQNR falls is where the error enters."""
    rows = sorted(result["layers"], key=lambda r: r["index"])
    names = [r["layer"] for r in rows]
    fig = _figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    ax = fig.add_subplot()
    xs = range(len(rows))
    for key, label, style, color in LAYER_SERIES:
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, color=color,
                    label=label, markersize=4)
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR vs float (dB, higher is better)")
    ax.set_title(f"per-layer error: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def ci_trends(panels: list, ylabel: str = "p50 ms"):
    """`panels`: (title, points), a point a dict of label (the run's short commit), value,
    lo and hi (its 95% CI, None when unknown) and flagged (its p50). One panel per series: the value
    per run with the CI as error bars, so a step can be told from the noise around it, and
    runs with a flagged regression circled in red."""
    cols = 2 if len(panels) > 1 else 1
    rows_n = math.ceil(len(panels) / cols)
    fig = _figure(figsize=(6 * cols, 2.8 * rows_n))
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False).ravel())
    for ax, (title, pts) in zip(axes, panels):
        x = np.arange(len(pts))
        v = [p["value"] for p in pts]
        err = [[p["value"] - p["lo"] if p.get("lo") is not None else 0.0 for p in pts],
               [p["hi"] - p["value"] if p.get("hi") is not None else 0.0 for p in pts]]
        ax.errorbar(x, v, yerr=err, fmt="o-", ms=3, capsize=3, label="p50 (95% CI)")
        bad = [i for i, p in enumerate(pts) if p.get("flagged")]
        if bad:
            ax.scatter(bad, [v[i] for i in bad], s=90, facecolors="none", edgecolors="red",
                       linewidths=2, label="p50 regression", zorder=4)
            ax.legend(fontsize=7)
        ax.set_xticks(x, [p["label"] for p in pts], rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig
