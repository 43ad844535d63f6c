"""Hardware-aware search: costs measured on the device, sensitivity, ILP, re-benchmark.

The per-layer latency (and energy) table is measured *in context*: starting from the fastest
uniform configuration the runtime offers (all layers at its integer precision), each layer in
turn is switched to float and the whole network is timed end to end on the device, so the
Q/DQ boundaries and fusions a switch brings or breaks are inside its cost. A layer switched
alone pays for the boundaries around it, but two float neighbours share none, so each
float-float edge of the graph gives back one β, fitted so that the table reproduces the
measured all-float latency (pair terms in the ILP, exact by linearisation). A configuration is
predicted as `baseline + Σ Δ(float layer) − β·#(float-float edges)`.

Every Δ is taken against the baseline, so an error in the baseline's one measurement would
shift all Δ alike and add up over every float layer of a mix (a baseline read 0.3 ms high made
a 10-float-layer mix look 3 ms fast). So the all-INT8 baseline is measured again every
`BASELINE_EVERY` configurations and each Δ is taken against the baseline interpolated between
the measurements around it: drift cancels, and the shared error splits into independent
pieces. The spread of those baseline measurements is the table's noise (`cost_noise_ms`):
a Δ smaller than about twice it is not resolved. The ILP picks the most
accurate configuration (least total sensitivity) under the budgets; the pick is built,
re-measured on the same device beside the uniform baselines, and predicted vs measured is
stored.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devices.measurement import Measurement, Protocol
from quant.spec import BitConfig, SpecError

from . import runner

FLOAT, INT8 = "fp32", "w8a8"
BASELINE_EVERY = 6   # cost-table configurations between re-measurements of the baseline
ALL_FLOAT = "*"   # cost-table row holding the measured all-float latency


@dataclass
class SearchResult:
    model: str
    device: str
    runtime: str
    status: str                                   # optimal | infeasible | failed
    budgets: dict                                 # as given (may be relative, "50%")
    resolved_budgets: dict = field(default_factory=dict)   # absolute values used by the ILP
    config: dict = field(default_factory=dict)    # layer -> precision
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)  # fastest and most accurate uniform variants
    message: str = ""
    cost_table: list = field(default_factory=list)
    frontier: list = field(default_factory=list)
    variant: str | None = None                    # config:PATH of the chosen BitConfig
    boundary_ms: float | None = None              # latency one float-float edge gives back
    cost_noise_ms: float | None = None            # stdev of the repeated baseline measurements

    def to_dict(self) -> dict:
        return asdict(self)


def _base_name(name: str) -> str:
    """`uniform-w8a8@3` (the third measurement of the baseline) -> `uniform-w8a8`."""
    return name.split("@", 1)[0]


def _with_baselines(names: list[str], baseline: str, every: int = BASELINE_EVERY) -> list[str]:
    """The measuring order: the baseline first, again after every `every` configurations,
    and last (`baseline@2`, `baseline@3`, ... for the repeats)."""
    order, k = [baseline], 1
    for i, name in enumerate(names, 1):
        order.append(name)
        if i % every == 0 or i == len(names):
            k += 1
            order.append(f"{baseline}@{k}")
    return order


def _interpolated_baseline(order: list[str], p50: dict, baseline: str) -> dict | None:
    """For each non-baseline name, the baseline's latency at its place in the order:
    linear between the nearest good baseline measurements before and after it."""
    marks = [(i, p50[n]) for i, n in enumerate(order) if _base_name(n) == baseline and p50[n]]
    if not marks:
        return None
    out = {}
    for i, name in enumerate(order):
        if _base_name(name) == baseline:
            continue
        before = [m for m in marks if m[0] < i][-1:] or marks[:1]
        after = [m for m in marks if m[0] > i][:1] or marks[-1:]
        (i0, v0), (i1, v1) = before[0], after[0]
        out[name] = v0 if i1 == i0 else v0 + (v1 - v0) * (i - i0) / (i1 - i0)
    return out


def median_p50(ms: list[Measurement]) -> float | None:
    vals = [m.latency_ms.get("p50") for m in ms if m.ok and m.latency_ms.get("p50") is not None]
    return statistics.median(vals) if vals else None


def _energy_mj(ms: list[Measurement]) -> float | None:
    vals = [m.energy_j_per_inference for m in ms if m.ok and m.energy_j_per_inference is not None]
    return statistics.median(vals) * 1e3 if vals else None


def _write_config(work: Path, name: str, config: BitConfig) -> str:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    return f"config:{path}"


def resolve_budgets(budgets: dict, table) -> dict[str, float]:
    """Relative budgets ("50%") -> absolute: 0% is the smallest total of that column among the
    uniform configurations and the per-layer cheapest one, 100% the largest (pair terms in)."""
    out = {}
    for col, v in budgets.items():
        if col not in table.columns:
            raise SpecError(f"budget {col!r}: the cost table has no such column "
                            f"(has: {', '.join(table.columns)})")
        if isinstance(v, str):
            cheap = {lay: min(table.options[lay], key=lambda p: table.costs[col][(lay, p)])
                     for lay in table.layers}
            dear = {lay: max(table.options[lay], key=lambda p: table.costs[col][(lay, p)])
                    for lay in table.layers}
            totals = [table.total(cfg, col) for cfg in
                      (cheap, dear, dict.fromkeys(table.layers, FLOAT), dict.fromkeys(table.layers, INT8))
                      if all(cfg[lay] in table.options[lay] for lay in table.layers)]
            lo, hi = min(totals), max(totals)
            out[col] = lo + float(v.rstrip("%")) / 100.0 * (hi - lo)
        else:
            out[col] = float(v)
    return out


def float_edges(model, layers: list[str]) -> list[tuple[str, str]]:
    """(producer, consumer) pairs of quantizable layers joined by a tensor path through
    non-quantizable ops only (ReLU, pooling, residual adds, flatten): where a Q/DQ pair sits
    between two INT8 layers and none between two float ones."""
    import torch.fx as fx

    graph = fx.symbolic_trace(model).graph
    wanted = set(layers)
    producers: dict[fx.Node, set[str]] = {}
    edges = []
    for node in graph.nodes:
        ins = {p for a in node.all_input_nodes for p in producers.get(a, ())}
        if node.op == "call_module" and node.target in wanted:
            edges += [(p, node.target) for p in sorted(ins)]
            producers[node] = {node.target}
        else:
            producers[node] = ins
    return edges


def _boundary_pairs(table, edges, all_float_ms: float | None):
    """Pair terms so that the table reproduces the measured all-float latency: switching one
    layer to float alone pays for the Q/DQ boundaries around it, two float neighbours share
    theirs, so each float-float edge gives back beta = (Σ Δ − measured gap) / #edges."""
    if not edges or all_float_ms is None or math.isnan(all_float_ms) or \
            "latency_ms" not in table.columns:
        return table, None
    additive = table.total(dict.fromkeys(table.layers, FLOAT), "latency_ms")
    beta = (additive - all_float_ms) / len(edges)
    return table.with_pairs([(a, FLOAT, b, FLOAT, {"latency_ms": -beta}) for a, b in edges]), beta


def _accuracy(entry, config: BitConfig) -> dict:
    """Top-1 on labelled data through the fake-quant model (ONNX Runtime agrees with it within
    0.3 pt: see the export tests), else top-1 agreement with the float model."""
    import torch

    from quant.pipeline import quantize_model

    res = quantize_model(entry, config)
    if res.quant_top1 is not None:
        return {"top1": res.quant_top1, "fp32_top1": res.fp32_top1}
    data = entry.data()
    with torch.no_grad():
        q = res.qmodel(data.test_x).argmax(-1)
        f = res.fmodel(data.test_x).argmax(-1)
    return {"agreement_fp32": float((q == f).float().mean())}


def run_search(model: str, device, runtime: str, budgets: dict, *, protocol: Protocol,
               work_dir: str | Path, store=None, run_id: str | None = None,
               sensitivity: str = "kl", calib_data: str = "real", samples: int = 16,
               distill_iters: int = 100, rounds: int = 2, sweep: str | None = None,
               points: int = 0, reuse_costs: bool = True, seed: int = 0,
               progress: Callable[[str], None] = lambda s: None) -> SearchResult:
    """The whole search for one (model, device, runtime). See the module docstring."""
    from quant.allocate import CostTable, frontier, solve_ilp
    from quant.models import load_model
    from quant.sensitivity import config_from_allocation, sensitivity_table
    from quant.transform import fold_bn, quantizable_layers
    from quant.zeroq import calibration_data

    entry = load_model(model)
    net = entry.build().eval()
    folded = fold_bn(net)
    layers = quantizable_layers(folded)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _check_runtime(runtime)
    from quant.pipeline import variant_bit_config

    int8_cfg = variant_bit_config(folded, INT8)
    result = SearchResult(model, device.name, runtime, "failed", dict(budgets))

    # (a) cost table, measured on the device, cached in the store
    rows = _cached_costs(store, model, device.name, runtime) if reuse_costs and store else None
    if rows is None:
        variants = {"uniform-" + FLOAT: FLOAT}
        for lay in layers:
            cfg = BitConfig({k: v for k, v in int8_cfg.layers.items() if k != lay})
            variants[f"float-{lay}"] = _write_config(work, f"{model}-float-{lay}", cfg)
        order = _with_baselines(list(variants), "uniform-" + INT8)
        progress(f"{model}: measuring per-layer costs on {device.name}/{runtime} "
                 f"({len(variants) + 1} configurations, the all-INT8 baseline "
                 f"{len(order) - len(variants)} times)")
        variants["uniform-" + INT8] = INT8
        arts = {name: runner.artifact_for(model, variants[_base_name(name)], work, runtime,
                                          seed=seed) for name in order}
        ms = runner.measure_artifacts(device, runtime, model, arts, protocol, rounds=1,
                                      store=store, run_id=run_id, kind="cost", on_result=progress)
        p50 = {name: median_p50(ms[name]) for name in order}
        baseline = _interpolated_baseline(order, p50, "uniform-" + INT8)
        if baseline is None:
            result.message = "the all-INT8 baseline failed on the device: " + \
                "; ".join(m.reason or "" for m in ms["uniform-" + INT8])
            return result
        repeats = [p50[n] for n in order if _base_name(n) == "uniform-" + INT8 and p50[n]]
        result.cost_noise_ms = statistics.stdev(repeats) if len(repeats) > 1 else None
        base = statistics.median(repeats)
        rows = [{"layer": ALL_FLOAT, "precision": FLOAT, "latency_ms":
                 base + (p50["uniform-" + FLOAT] - baseline["uniform-" + FLOAT])
                 if p50["uniform-" + FLOAT] else float("nan")}]
        for lay in layers:
            lat = p50[f"float-{lay}"]
            delta = (lat - baseline[f"float-{lay}"]) if lat else float("nan")
            rows.append({"layer": lay, "precision": INT8, "latency_ms": base / len(layers)})
            rows.append({"layer": lay, "precision": FLOAT,
                         "latency_ms": base / len(layers) + delta})
    # (b) sensitivity on distilled or real data
    progress(f"{model}: {sensitivity} sensitivity on {calib_data} data")
    data = entry.data()
    extra = {"iters": distill_iters} if calib_data == "distilled" else {}
    x = calibration_data(calib_data, net, real=data.calib_x, n=samples,
                         input_shape=entry.input_shape, seed=seed, name=model, **extra)
    all_float = next((r["latency_ms"] for r in rows if r["layer"] == ALL_FLOAT), None)
    rows = [r for r in rows if r["layer"] != ALL_FLOAT]
    sens = sensitivity_table(net, x, bits=(8,), method=sensitivity, act_bits=8)
    sens_by = {(r.layer, r.precision): r for r in sens.itertuples()}
    full = []
    for r in rows:
        s = sens_by.get((r["layer"], r["precision"]))
        full.append({**r, "sensitivity": float(s.sensitivity) if s is not None else 0.0,
                     "size_bits": float(s.size_bits) if s is not None else
                     float(_float_size(folded, r["layer"]))})
    result.cost_table = full
    if store is not None:
        store.add_cost_rows(run_id, [{**r, "model": model, "device": device.name, "runtime": runtime,
                                      "method": f"switch-one/{sensitivity}"} for r in full] +
                            ([{"layer": ALL_FLOAT, "precision": FLOAT, "latency_ms": all_float,
                               "model": model, "device": device.name, "runtime": runtime,
                               "method": "uniform"}] if all_float is not None else []))
    table = CostTable.from_rows(full)
    table, result.boundary_ms = _boundary_pairs(table, float_edges(folded, layers), all_float)
    # (c) the ILP under the budgets
    resolved = resolve_budgets(budgets, table)
    result.resolved_budgets = resolved
    alloc = solve_ilp(table, resolved)
    result.status, result.message = alloc.status, alloc.message
    if not alloc.ok:
        return result
    picks = [("chosen", alloc)]
    if sweep and points:
        picks += [(f"sweep-{i}", a) for i, a in enumerate(frontier(table, sweep, points)) if a.ok]
    # (d) build and re-measure beside the uniform baselines; (e) predicted vs measured
    arts = {"uniform-" + INT8: runner.artifact_for(model, INT8, work, runtime, seed=seed),
            "uniform-" + FLOAT: runner.artifact_for(model, FLOAT, work, runtime, seed=seed)}
    cfgs = {}
    for name, a in picks:
        cfg = config_from_allocation(folded, a.config, act_bits=8)
        cfgs[name] = (cfg, a, _write_config(work, f"{model}-{device.name}-{runtime}-{name}", cfg))
        arts[name] = runner.artifact_for(model, cfgs[name][2], work, runtime, seed=seed)
    progress(f"{model}: re-measuring {len(picks)} chosen configuration(s) beside the baselines")
    ms = runner.measure_artifacts(device, runtime, model, arts, protocol, rounds=rounds,
                                  store=store, run_id=run_id, kind="search", on_result=progress)
    acc = {n: _accuracy(entry, c[0]) for n, c in cfgs.items()}
    base_acc = {u: _accuracy(entry, variant_bit_config(folded, u.split("-")[1]))
                for u in ("uniform-" + INT8, "uniform-" + FLOAT)}
    result.baseline = _baselines({u: (median_p50(ms[f"uniform-{u}"]), base_acc[f"uniform-{u}"])
                                  for u in (INT8, FLOAT)})
    points_out = []
    for name, (cfg, a, variant) in cfgs.items():
        predicted = {k: a.totals[k] for k in a.totals if k in ("latency_ms", "energy_mj", "size_bits")}
        if result.cost_noise_ms is not None:
            predicted["latency_noise_ms"] = result.cost_noise_ms
        measured = {"latency_ms": median_p50(ms[name]), "energy_mj": _energy_mj(ms[name]),
                    "size_bits": a.totals.get("size_bits")}
        measured = {k: v for k, v in measured.items() if v is not None}
        if "agreement_fp32" in acc[name]:       # no labels: agreement is kept, not called top-1
            measured["agreement_fp32"] = acc[name]["agreement_fp32"]
        if predicted.get("latency_ms") and measured.get("latency_ms"):
            measured["latency_error"] = (predicted["latency_ms"] - measured["latency_ms"]) \
                / measured["latency_ms"]
        point = {"name": name, "config": a.config, "predicted": predicted, "measured": measured,
                 "accuracy": acc[name], "variant": variant, "objective": a.objective}
        points_out.append(point)
        if store is not None:
            store.add_allocation(run_id, model, device.name, runtime, name, budgets=resolved,
                                 config=cfg.to_dict(), predicted=predicted, measured=measured,
                                 accuracy=acc[name].get("top1"),  # labelled top-1 only
                                 variant=variant)
    chosen = points_out[0]
    result.config, result.predicted = chosen["config"], chosen["predicted"]
    result.measured, result.accuracy, result.variant = chosen["measured"], chosen["accuracy"], chosen["variant"]
    result.frontier = points_out[1:]
    return result


def _baselines(uniform: dict[str, tuple[float | None, dict]]) -> dict:
    """The fastest and the most accurate uniform variants, as measured (on a tiny model the
    float one can be the faster: Q/DQ overhead outweighs the integer kernels)."""
    def acc(a: dict) -> float:
        return a.get("top1", a.get("agreement_fp32", 0.0))

    rows = {v: {"variant": v, "latency_ms": lat, "accuracy": a} for v, (lat, a) in uniform.items()}
    timed = [v for v in rows if rows[v]["latency_ms"] is not None]
    fastest = min(timed, key=lambda v: rows[v]["latency_ms"]) if timed else INT8
    best = max(rows, key=lambda v: (acc(rows[v]["accuracy"]), v == FLOAT))
    return {"fastest": rows[fastest], "most_accurate": rows[best]}


def _check_runtime(runtime: str) -> None:
    """The search chooses between float and the runtime's INT8 kernels per layer; a runtime
    without INT8 kernels for convolutions and linear layers has nothing to choose from."""
    import importlib

    from devices.runtimes import module_name

    offered = importlib.import_module(f"devices.runtimes.{module_name(runtime)}").precisions()
    missing = [kind for kind in ("conv", "linear") if INT8 not in offered.get(kind, ())]
    if missing:
        raise SpecError(f"runtime {runtime} has no {INT8} kernels for {', '.join(missing)} "
                        "layers: nothing to search over")


def _float_size(model, layer: str) -> int:
    m = model.get_submodule(layer)
    return sum(p.numel() for p in m.parameters()) * 32


def _cached_costs(store, model: str, device: str, runtime: str) -> list[dict] | None:
    """The newest measured cost table for this (model, device, runtime), if any."""
    rows = [r for r in store.rows("cost_tables") if r.get("model") == model
            and r.get("device") == device and r.get("runtime") == runtime
            and str(r.get("method", "")).startswith("switch-one")]  # a measured table
    if not rows:
        return None
    newest = max(r["run_id"] for r in rows)
    return [{"layer": r["layer"], "precision": r["precision"], "latency_ms": r["latency_ms"]}
            for r in store.rows("cost_tables") if r["run_id"] == newest and r["model"] == model
            and r["device"] == device and r["runtime"] == runtime]
