"""Section builders for the bit-allocation searches: each search's outcome (for the summary),
the configs it found, predicted against measured latency, and `hilq debug`'s per-layer error
of the pick (whose table and notes `hilq debug` itself shares, bench/debug_report.py)."""

from __future__ import annotations

from . import plots
from .data import RunData
from .model import Plot, Table, Text, fmt, kv

LAYER_HEAD = ["#", "layer", "precision", "SQNR dB", "simulated dB", "gap dB", "cosine",
              "own dB", "own simulated dB", "inherited dB"]


def outcomes(allocs: list) -> list:
    """Each search's outcome, to head the summary: a red alert when its pick missed the
    budget, and its iterations (pick predicted ± sd, measured ± CI, within budget or not)."""
    out = []
    for a in (a for a in allocs if a["name"] == "chosen"):
        m, b = a["measured"] or {}, (a["budgets"] or {}).get("latency_ms")
        what = f"search {a['model']} on {a['device']}/{a['runtime']}"
        status = m.get("search_status", "ok")
        out.append(Text(f"{what}: {status.upper()}: budget {fmt(b)} ms, pick measured "
                        f"{fmt(m.get('latency_ms'))} ± {fmt(m.get('latency_ci_ms'), 2)} ms "
                        f"after {m.get('iterations', '?')} iteration(s)"
                        + (f" ({m['message']})" if m.get("message") else ""),
                        alert=status != "ok"))
        its = sorted((x for x in allocs if x["name"].startswith("iteration-") and
                      (x["model"], x["device"], x["runtime"]) ==
                      (a["model"], a["device"], a["runtime"])), key=lambda x: x["name"])
        # speed: the machine's in that batch relative to the budget's, from the uniforms
        # measured beside the pick; the error is judged at that speed (bench.loop)
        out.append(Table(["iteration", "predicted ms", "± sd", "margin ms", "measured ms",
                          "± CI", "speed", "error %", "unscaled error %", "budget ms",
                          "within budget"], [_iteration_row(x, b) for x in its]))
    return out


def _iteration_row(x: dict, budget) -> list:
    p, m = x["predicted"], x["measured"] or {}
    return [x["name"].split("-", 1)[1], fmt(p.get("latency_ms")),
            fmt(p.get("latency_sd_ms"), 2), fmt(p.get("margin_ms"), 2),
            fmt(m.get("latency_ms")), fmt(m.get("latency_ci_ms"), 2), fmt(m.get("speed"), 3),
            *(fmt(None if m.get(k) is None else 100 * m[k], 2)
              for k in ("latency_error", "latency_error_unscaled")), fmt(budget),
            "yes" if m.get("within_budget") else "MISSED"]


def allocation(d: RunData) -> list:
    have = [a for a in d.allocs if a["config"]]
    if not have:
        return [Text("No searched configs in this run.")]
    out = [Table(["name", "model", "device/runtime", "budgets", "predicted", "measured",
                  "top-1"],
                 [[a["name"], a["model"], f"{a['device']}/{a['runtime']}", kv(a["budgets"]),
                   kv(a["predicted"]), kv(a["measured"]), fmt(a["accuracy"], 4)]
                  for a in have])]
    out += [Plot(f"allocation_{i}", plots.png(plots.allocation(a))) for i, a in enumerate(have)]
    names = [_layer_names(a["config"]) for a in have]
    layers = list(dict.fromkeys(n for cfg in names for n in cfg))
    return out + [Table(["layer", *[a["name"] for a in have]],
                        [[layer, *[cfg.get(layer, "–") for cfg in names]]
                         for layer in layers])]


def _layer_names(config: dict) -> dict[str, str]:
    """layer -> `w4a8`-style name, through `BitConfig` so the spelling is the project's."""
    from hilq.quant.spec import BitConfig, SpecError

    try:
        return BitConfig.from_dict(config).summary()
    except (SpecError, TypeError, KeyError) as e:
        return dict.fromkeys(config, f"unreadable ({e})")


def predicted(d: RunData) -> list:
    pts = [(a["name"], a["predicted"]["latency_ms"], a["measured"]["latency_ms"],
            a["predicted"].get("latency_sd_ms"))
           for a in d.allocs if (a["predicted"] or {}).get("latency_ms") is not None
           and (a["measured"] or {}).get("latency_ms") is not None]
    if not pts:
        return [Text("No searched config with both predicted and measured latency in this "
                     "run.")]
    return [Plot("predicted_vs_measured", plots.png(plots.predicted(pts))),
            Table(["config", "predicted ms", "measured ms", "error % (pred − meas) / meas"],
                  [[n, fmt(pr), fmt(me), fmt(100 * (pr / me - 1), 2)]
                   for n, pr, me, _ in pts])]


def debug(d: RunData) -> list:
    """`hilq debug` of each searched configuration (the nightly runs it on the pick): the
    worst-first per-layer table and its plot, engine beside simulation."""
    found = [(a, (a.get("measured") or {}).get("debug")) for a in d.allocs
             if a["name"] == "chosen"]
    found = [(a, r) for a, r in found if r and r.get("layers")]
    if not found:
        return [Text("No per-layer debug of a searched configuration in this run.")]
    out = []
    for a, r in found:
        out.append(Text(f"{a['model']} on {a['device']}/{a['runtime']}, the chosen "
                        f"configuration ({r.get('n')} samples, status {r.get('status')})."))
        out += [*map(Text, layer_lines(r)), Table(LAYER_HEAD, layer_rows(r)),
                Plot(f"debug-{a['model']}-{a['device']}-{a['runtime']}",
                     plots.png(plots.layer_error(r, layer_title(r))))]
    return out


def layer_title(result: dict) -> str:
    where = (f"{result.get('runtime')} on {result.get('device')}" if result.get("runtime")
             else "simulation only")
    return f"{result.get('model')} {result.get('variant')}, {where}, {result.get('n')} samples"


def layer_rows(result: dict) -> list[list[str]]:
    """`hilq debug`'s layers as table rows, in the result's worst-first order."""
    f = _num
    return [[str(i), r["layer"], str(r.get("precision") or ""), f(r.get("sqnr_db")),
             f(r.get("sqnr_db_simulated")), f(r.get("gap_db"), "+.2f"),
             f(r.get("cosine"), ".5f"), f(r.get("own_error_db")),
             f(r.get("own_error_db_simulated")), f(r.get("inherited_db"))]
            for i, r in enumerate(result["layers"], 1)]


def layer_lines(result: dict) -> list[str]:
    """Where the error enters, how the engine run went, and `hilq debug`'s notes."""
    out = []
    if result.get("culprits"):
        out.append(f"Error introduced most at `{result['culprits'][0]}` (lowest own error: "
                   "the layer fed the float model's input).")
    if result.get("status") not in (None, "ok", "simulated"):
        out.append(f"Engine run: {result.get('status')}"
                   + (f" ({result.get('reason')})" if result.get("reason") else "") + ".")
    return out + [f"Note: {n}" for n in result.get("notes") or []]


def _num(v, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)
