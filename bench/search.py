"""Hardware-aware search: the engine's profile, a fitted latency model, the ILP, the loop.

1. The four profile patterns (all-INT8, all-float, two alternating mixes: `latmodel`) are
   built, timed beside each other on the device and profiled there (one profiled agent run
   each, never the timed run): every layer's kernel time at each precision and the Q/DQ cost
   per precision boundary, the latency model's prior.
2. The model is fitted to every whole-network timing of this model on this device and
   runtime: tonight's and the store's history (scaled by each night's all-INT8 latency, so
   a slower night shifts its data, not the model).
3. Sensitivity (KL or Hessian) per layer on real or data-free calibration data.
4. The closed loop (`bench.loop`): "NN%" resolved between the *measured* uniforms, the ILP
   under the budget minus a margin from the pick's prediction sd, the pick built and
   re-measured beside the uniforms, refitted and re-solved until it holds, or `budget_missed`.
Every measurement, profile and iteration is stored.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hilq.quant.spec import CALIB_DATA, DISTILL_ITERS, SENSITIVITIES, SpecError

from hilq.measurement import Protocol

from . import loop
from .latmodel import FLOAT, INT8
from .search_accuracy import _loss, _store_pick, _sweep, fastest_within, figure
from .search_context import (
    Context,
    _check_runtime,
    _float_size,
    _write_config,
    float_edges,
    history,
    measure_patterns,
)

STATUSES = ("ok", "budget_missed", "infeasible", "failed")


@dataclass
class SearchResult:
    model: str
    device: str
    runtime: str
    status: str                                   # ok | budget_missed | infeasible | failed
    budgets: dict                                 # as given (may be relative, "50%")
    resolved_budgets: dict = field(default_factory=dict)   # absolute values (ms, bits)
    config: dict = field(default_factory=dict)    # layer -> precision
    predicted: dict = field(default_factory=dict)   # latency_ms, latency_sd_ms, margin_ms, ...
    measured: dict = field(default_factory=dict)    # latency_ms, latency_ci_ms, latency_error
    accuracy: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)  # fastest and most accurate uniform variants
    message: str = ""
    iterations: list = field(default_factory=list)   # bench.loop.Iteration dicts
    loo: list = field(default_factory=list)       # leave-one-out errors of the final model
    latency_model: dict = field(default_factory=dict)
    cost_table: list = field(default_factory=list)   # the final model as ILP rows
    frontier: list = field(default_factory=list)
    variant: str | None = None                    # config:PATH of the chosen BitConfig
    prior: str = ""                               # profile | flat (runtime cannot profile)
    accuracy_checks: list = field(default_factory=list)   # accuracy-limited: the bisection

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class SearchOptions:
    """What one search is asked for and how hard it looks; the defaults are the nightly's.

    Either a latency budget (`budgets["latency_ms"]`, ms or "NN%" of the way from the
    measured all-INT8 to all-float; `size_bits` may join it) or an accuracy limit
    (`max_drop` top-1 points against float, or `min_agreement` with float's predictions)."""

    budgets: dict = field(default_factory=dict)
    max_drop: float | None = None
    # what max_drop is measured in: top1 (points), or a figure the model reports, its own
    # units: a task figure (map_iou, detection_map50, sequence_agreement) or a --metric name
    drop_metric: str = "top1"
    min_agreement: float | None = None
    sensitivity: str = "kl"              # kl (ZeroQ) | hessian (HAWQ)
    calib_data: str = "real"             # real | distilled (ZeroQ) | ...
    samples: int = 16                    # calibration inputs for the sensitivity
    distill_iters: int = DISTILL_ITERS
    rounds: int = 2                      # alternating rounds per measurement batch
    reuse_costs: bool = True             # earlier nights' measurements join the fit
    seed: int = 0
    z: float = loop.Z_MARGIN             # the margin: z × the pick's prediction sd
    tolerance: float = loop.TOLERANCE    # the measured CI the loop accepts
    max_iters: int = loop.MAX_ITERS
    sweep: int = 0                       # > 1: also the frontier at that many budgets

    def __post_init__(self):
        self.check()

    @property
    def accuracy_limited(self) -> bool:
        return self.max_drop is not None or self.min_agreement is not None

    def check(self) -> None:
        """One line naming the first setting that cannot be searched, before any work."""
        unknown = set(self.budgets) - set(loop.BUDGETS)
        if unknown:
            raise SpecError(f"budget {', '.join(sorted(unknown))}: the search fits latency "
                            "(and counts size exactly); an energy model is not built yet")
        if ("latency_ms" in self.budgets) == self.accuracy_limited:
            raise SpecError("give a latency budget (latency_ms=50%) or an accuracy limit "
                            "(max drop top1=0.5 / min agreement 0.99), one of them")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise SpecError(f"min agreement {self.min_agreement}: give a fraction in (0, 1]")
        if self.sweep == 1 or self.sweep < 0:
            raise SpecError(f"sweep {self.sweep}: needs at least 2 points")
        if self.sensitivity not in SENSITIVITIES:
            raise SpecError(f"sensitivity {self.sensitivity!r}: use "
                            f"{', '.join(SENSITIVITIES)}")
        if self.calib_data not in CALIB_DATA:
            raise SpecError(f"calib data {self.calib_data!r}: use {', '.join(CALIB_DATA)}")
        for name in ("samples", "distill_iters", "rounds", "max_iters"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', ' ')} {getattr(self, name)}: at least 1")
        if self.tolerance <= 0 or self.z <= 0:
            raise SpecError(f"tolerance {self.tolerance} / z {self.z}: both must be positive")


@dataclass
class _Costs:
    """Phase 1's answer: tonight's pattern timings, the engine-profile prior, the history."""

    seeded: dict                 # pattern name -> (config, p50 per round)
    prior: object
    past: list
    int8_ms: float
    float_ms: float


@dataclass
class _Sensitivity:
    """Phase 2's answer: sensitivity and size per (layer, precision), the size limit, and the
    uniforms' accuracy."""

    by: dict
    size: dict
    limits: dict
    base_acc: dict


def run_search(model, device, runtime: str, options: SearchOptions, *, protocol: Protocol,
               work_dir: str | Path, store=None, run_id: str | None = None,
               progress: Callable[[str], None] = lambda s: None) -> SearchResult:
    """The whole search for one (model, device, runtime), in four named phases (the module
    docstring says what each does): costs, sensitivity, allocate (the closed loop), record.

    With a latency budget: the most accurate configuration that meets it. With an accuracy
    limit: the fastest configuration within it, each candidate's accuracy measured."""
    from hilq.quant.models import load_model, name_of
    from hilq.quant.transform import fold_bn, quantizable_layers

    ref, name = model, name_of(model)
    entry = load_model(ref)
    graph = _graph_model(entry, ref, options, progress)
    if graph is None:
        net = entry.build().eval()
        folded = fold_bn(net)
        layers = quantizable_layers(folded)
        edges = float_edges(folded, layers)
    else:
        net = folded = None
        layers, edges = list(graph.layers), graph.edges()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _check_runtime(runtime)
    ctx = Context(model=name, entry=entry, folded=folded, layers=layers, edges=edges,
                  device=device, runtime=runtime, protocol=protocol, work=work, store=store,
                  run_id=run_id, rounds=options.rounds, seed=options.seed, progress=progress,
                  ref=ref, calib_data=options.calib_data, graph=graph,
                  distill_iters=options.distill_iters)
    result = SearchResult(name, device.name, runtime, "failed", dict(options.budgets))
    costs = measure_costs(ctx, options)
    if isinstance(costs, str):
        result.message = costs
        return result
    result.prior = costs.prior.source
    sens = sensitivities(ctx, net, options)
    result.baseline = _baselines({INT8: (costs.int8_ms, sens.base_acc[INT8]),
                                  FLOAT: (costs.float_ms, sens.base_acc[FLOAT])})
    try:
        res = allocate(ctx, options, costs, sens, result)
    except loop.SearchFailure as e:     # a typed failure of this search, not a traceback
        result.message = str(e)
        return result
    record(ctx, options, costs, sens, res, result)
    return result


def _graph_model(entry, ref, options: SearchOptions, progress):
    """The file as the ONNX route sees it, where that route builds its variants; else None
    (the PyTorch route: built-ins, factories, files onnx2torch converts)."""
    from hilq.quant.models import ModelRef
    from hilq.quant.onnx_artifact import route_of

    if not entry.onnx_path:
        return None
    ref = ref if isinstance(ref, ModelRef) else ModelRef(entry.name)
    route, why = route_of(entry, ref.route)
    if route != "onnx":
        return None
    if options.calib_data != "real":
        raise SpecError(f"--calib-data {options.calib_data}: the ONNX route ({why}) calibrates "
                        "on real inputs; give --data")
    from hilq.quant.graph_route import GraphModel
    from hilq.quant.onnx_feeds import load_feeds

    progress(f"{entry.name}: searched on its ONNX graph ({why})")
    return GraphModel.of(entry, load_feeds(entry, ref.data, ref.preprocess, options.seed))


def measure_costs(ctx: Context, options: SearchOptions) -> _Costs | str:
    """Phase 1: the profile patterns timed beside each other and profiled (the prior), and
    the store's earlier measurements of this model here; a string says why not."""
    seeded, prior = measure_patterns(ctx)
    if seeded is None:
        return prior
    past = history(ctx.store, ctx.model, ctx.device.name, ctx.runtime, ctx.layers,
                   ctx.protocol, ctx.run_id) if ctx.store is not None and options.reuse_costs \
        else []
    if past:
        ctx.progress(f"{ctx.model}: {len(past)} earlier measurements of this model join the fit")
    q_ms, f_ms = (statistics.median(seeded[f"uniform-{u}"][1]) for u in (INT8, FLOAT))
    return _Costs(seeded, prior, past, q_ms, f_ms)


def sensitivities(ctx: Context, net, options: SearchOptions) -> _Sensitivity:
    """Phase 2: each layer's sensitivity (KL or Hessian) and size per precision, the size
    budget resolved, and the uniforms' accuracy."""
    by, size = _sensitivity(ctx, net, options.sensitivity, options.calib_data, options.samples,
                            options.distill_iters)
    limits = {}
    if "size_bits" in options.budgets:
        lo, hi = (sum(size[(lay, p)] for lay in ctx.layers) for p in (INT8, FLOAT))
        limits["size_bits"] = (size, loop.resolve(options.budgets["size_bits"], lo, hi))
    base_acc = {u: ctx.accuracy(loop.uniform(ctx.layers, u)) for u in (INT8, FLOAT)}
    return _Sensitivity(by, size, limits, base_acc)


def allocate(ctx: Context, options: SearchOptions, costs: _Costs, sens: _Sensitivity,
             result: SearchResult) -> loop.LoopResult:
    """Phase 3: the ILP under the budget, each pick re-measured until one holds (bench.loop);
    under an accuracy limit, first the bisection for the budget that keeps it."""
    kw = dict(history=costs.past, measured=costs.seeded, z=options.z,
              tolerance=options.tolerance, max_iters=options.max_iters, limits=sens.limits,
              progress=ctx.progress)
    if options.accuracy_limited:
        return fastest_within(ctx, sens.by, costs.prior, sens.base_acc[FLOAT],
                               options.max_drop, options.min_agreement, result,
                               drop_metric=options.drop_metric, **kw)
    return loop.close_loop(ctx.layers, ctx.edges, sens.by, costs.prior, ctx.measure,
                           options.budgets["latency_ms"], **kw)


def record(ctx: Context, options: SearchOptions, costs: _Costs, sens: _Sensitivity,
           res: loop.LoopResult, result: SearchResult) -> None:
    """Phase 4: the result filled in (the pick, its prediction and measurement, its accuracy
    in simulation and on the device, the accuracy limit checked on both), the fitted cost
    table and every pick stored, and the frontier swept when asked."""
    store, size = ctx.store, sens.size
    result.status, result.message = res.status, res.message
    result.resolved_budgets = {"latency_ms": res.budget_ms,
                               **{c: b for c, (_, b) in sens.limits.items()}}
    result.iterations = [asdict(it) for it in res.iterations]
    model_fit = res.model
    if model_fit is not None:
        result.latency_model = model_fit.summary()
        result.loo = model_fit.loo()
        rows, _ = model_fit.costs()
        result.cost_table = [{"layer": lay, "precision": p, "latency_ms": v,
                              "sensitivity": sens.by[(lay, p)], "size_bits": size[(lay, p)]}
                             for (lay, p), v in rows.items()]
        if store is not None:
            store.add_cost_rows(ctx.run_id, [
                {**r, "model": ctx.model, "device": ctx.device.name, "runtime": ctx.runtime,
                 "method": f"fitted/{options.sensitivity}"} for r in result.cost_table])
    for it in res.iterations:
        _store_pick(ctx, f"iteration-{it.index}", it, result.resolved_budgets, None)
    if res.config:
        final = next(it for it in reversed(res.iterations) if it.config == res.config)
        cfg = ctx.bit_config(res.config)
        result.variant = _write_config(ctx.work, f"{ctx.tag}-chosen", cfg)
        result.config = dict(res.config)
        result.accuracy = ctx.accuracy(res.config)
        result.predicted = {"latency_ms": final.predicted_ms,
                            "latency_sd_ms": final.predicted_sd_ms, "margin_ms": final.margin_ms,
                            "size_bits": sum(size[(lay, p)] for lay, p in res.config.items())}
        result.measured = {"latency_ms": final.measured_ms, "latency_ci_ms": final.measured_ci_ms,
                           "latency_error": final.error,
                           "latency_error_unscaled": final.raw_error, "speed": final.speed,
                           "within_budget": final.within_budget,
                           "search_status": res.status, "iterations": len(res.iterations)}
        if "agreement_fp32" in result.accuracy:
            result.measured["agreement_fp32"] = result.accuracy["agreement_fp32"]
        dev = ctx.device_accuracy.get(tuple(sorted(res.config.items())))
        if dev:   # what the engine computed over the evaluation set, beside the simulation
            result.accuracy.update({f"device_{k}": dev.get(k) for k in ("top1", "agreement_fp32",
                                                                         "kl", "sqnr_db", "n")})
            result.measured.update(device_top1=dev.get("top1"),
                                   device_agreement_fp32=dev.get("agreement_fp32"))
        if options.accuracy_limited:
            _check_accuracy_limit(result, dev, sens.base_acc[FLOAT], options)
        _store_pick(ctx, "chosen", final, result.resolved_budgets, result)
    if options.sweep > 1 and model_fit is not None:
        try:     # the frontier is extra: its failure is said, the pick above stands
            result.frontier = _sweep(ctx, model_fit, sens.by, costs.int8_ms, costs.float_ms,
                                     options.sweep, options.z, sens.limits)
        except loop.SearchFailure as e:
            result.message = "; ".join(filter(None, [result.message, f"no frontier: {e}"]))


def _sensitivity(ctx: Context, net, method, calib_data, samples, distill_iters):
    """(sensitivity, size in bits) per (layer, precision) on real or data-free data."""
    from hilq.quant.sensitivity import sensitivity_table
    from hilq.quant.zeroq import calibration_data, input_prior

    ctx.progress(f"{ctx.model}: {method} sensitivity on {calib_data} data")
    if ctx.graph is not None:
        if method != "kl":
            raise SpecError(f"--sensitivity {method}: the ONNX route measures each layer's "
                            "divergence on the graph (kl); the Hessian needs PyTorch")
        sens = ctx.graph.sensitivity(ctx.progress)
        by = {(lay, INT8): v for lay, v in sens.items()}
        by.update({(lay, FLOAT): 0.0 for lay in ctx.layers})
        size = {(lay, p): float(ctx.graph.size_bits(lay, 8 if p == INT8 else None))
                for lay in ctx.layers for p in (INT8, FLOAT)}
        return by, size
    data = ctx.entry.data()
    extra = ({"iters": distill_iters, **input_prior(ctx.entry.preprocess)}
             if calib_data == "distilled" else {})
    x = calibration_data(calib_data, net, real=data.calib_x, n=samples,
                         input_shape=ctx.entry.input_shape, seed=ctx.seed, name=ctx.model, **extra)
    sens = sensitivity_table(net, x, bits=(8,), method=method, act_bits=8)
    sens_by = {(r.layer, r.precision): float(r.sensitivity) for r in sens.itertuples()}
    size = {(r.layer, r.precision): float(r.size_bits) for r in sens.itertuples()}
    for lay in ctx.layers:
        full = float(_float_size(ctx.folded, lay))
        sens_by.setdefault((lay, FLOAT), 0.0)
        sens_by.setdefault((lay, INT8), 0.0)
        size.setdefault((lay, FLOAT), full)
        size.setdefault((lay, INT8), full / 4)
    return sens_by, size


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


def _check_accuracy_limit(result: SearchResult, dev: dict | None, float_acc: dict,
                          options: SearchOptions) -> None:
    """The limit holds only if it holds in simulation and on the device; else budget_missed."""
    checks = [("simulated", result.accuracy)]
    if dev and (dev.get("top1") is not None or dev.get("agreement_fp32") is not None
                or figure(dev, options.drop_metric) is not None):
        checks.append(("device", {k: dev[k] for k in ("top1", "agreement_fp32", "task", "metric")
                                  if dev.get(k) is not None}))
    misses = []
    for where, acc in checks:
        over, limit = _loss(acc, float_acc, options.max_drop, options.min_agreement,
                            options.drop_metric)
        result.measured[f"accuracy_within_limit_{where}"] = over <= 0
        if over > 0:
            misses.append(f"{where} {acc}")
    result.measured["accuracy_within_limit"] = not misses
    if misses:
        result.status = result.measured["search_status"] = "budget_missed"
        result.message = f"the pick's accuracy misses the limit {limit}: " + "; ".join(misses)
