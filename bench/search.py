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

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hilq.measurement import Measurement, Protocol
from quant.spec import CALIB_DATA, DISTILL_ITERS, SENSITIVITIES, BitConfig, SpecError

from . import latmodel, loop, runner
from .latmodel import FLOAT, INT8

STATUSES = ("ok", "budget_missed", "infeasible", "failed")
PROFILE_ITERS = 20
BISECT_STEPS = 6       # accuracy-limited search: candidates whose accuracy is measured


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


def median_p50(ms: list[Measurement]) -> float | None:
    vals = _p50s(ms)
    return statistics.median(vals) if vals else None


def _p50s(ms: list[Measurement]) -> list[float]:
    return [m.latency_ms["p50"] for m in ms if m.ok and m.latency_ms.get("p50") is not None]


def _write_config(work: Path, name: str, config: BitConfig) -> str:
    # a model given as a path (`models/det.onnx`) names a file here, not a folder
    path = work / f"{name.strip('/').replace('/', '_').replace(':', '_')}.json"
    path.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    return f"config:{path}"


def precisions_of(bit_config: dict | None, layers) -> dict[str, str] | None:
    """A stored BitConfig dict -> {layer: w8a8 | fp32}, or None if it holds anything else
    (another bit width: not a point of this search's two-precision model)."""
    if bit_config is None:
        return None
    out = {}
    for lay in layers:
        spec = bit_config.get(lay)
        if spec is None:
            out[lay] = FLOAT
        elif (spec.get("weight") or {}).get("bits") == 8 and (spec.get("act") or {}).get("bits") == 8:
            out[lay] = INT8
        else:
            return None
    return out if set(bit_config) <= set(layers) else None


def batch_of(variant: str) -> tuple[str, str]:
    """A stored search variant -> (batch, name): `it<N>-<name>` was the search's N-th
    measurement (`Context.measure`), anything else batch "0" (the patterns)."""
    it = re.match(r"it(\d+)-(.*)", variant)
    return (it.group(1), it.group(2)) if it else ("0", variant)


def history(store, model: str, device: str, runtime: str, layers, protocol: Protocol,
            exclude_run: str | None) -> list[latmodel.Observation]:
    """Earlier nights' whole-network timings of two-precision configs under the same batch
    and threads. Within a night each batch (the patterns, each iteration's pick beside the
    uniforms, a Δ table) is put on the scale of that night's patterns
    (`latmodel.on_one_scale`); each night is then scaled by its all-INT8 latency relative
    to the newest night's: a uniformly slower machine moves its data onto one scale, not
    into the layer costs."""
    per_run: dict[str, dict[str, tuple[dict, list[float]]]] = {}
    for r in store.config_latencies(model, device, runtime):
        p = r["protocol"] or {}
        if r["run_id"] == exclude_run or p.get("batch", 1) != protocol.batch or \
                p.get("threads", 0) != protocol.threads or p.get("profile_iters"):
            continue
        cfg = precisions_of(r["bit_config"], layers)
        if cfg is None:
            continue
        key = f"{r['kind']}/{batch_of(r['variant'])[0]}:{r['variant']}"
        per_run.setdefault(r["run_id"], {}).setdefault(key, (cfg, []))[1].append(r["p50_ms"])
    q = dict.fromkeys(layers, INT8)
    nights = {}
    for run, rows in per_run.items():
        obs, _ = latmodel.on_one_scale(rows, "search/0")
        int8 = [o for o in loop.pooled(obs) if o.config == q]
        if int8:
            nights[run] = (int8[0].latency_ms, obs)
    if not nights:
        return []
    ref = nights[max(nights)][0]       # run ids sort by time
    return [latmodel.Observation(ob.config, ref / q_ms * ob.latency_ms, ref / q_ms * ob.se_ms,
                                 f"{run}:{ob.name}")
            for run, (q_ms, obs) in nights.items() for ob in obs]


def _accuracy(entry, config: BitConfig, calib_data: str = "real") -> dict:
    """Top-1 on labelled data through the fake-quant model (ONNX Runtime agrees with it within
    0.3 pt: see the export tests), else top-1 agreement with the float model."""
    import torch

    from quant.pipeline import quantize_model
    from quant.spec import DISTILL_ITERS

    res = quantize_model(entry, config, calib_data=calib_data, distill_iters=DISTILL_ITERS)
    if res.quant_top1 is not None:
        return {"top1": res.quant_top1, "fp32_top1": res.fp32_top1}
    data = entry.data()
    with torch.no_grad():
        q = res.qmodel(data.test_x).argmax(-1)
        f = res.fmodel(data.test_x).argmax(-1)
    return {"agreement_fp32": float((q == f).float().mean())}



@dataclass
class Context:
    """What every phase of one search shares: the model, its layers and edges, the device,
    the artifacts built so far (one per configuration), tonight's timed patterns and the
    latency model's prior and history."""

    model: str
    entry: object
    folded: object
    layers: list
    edges: list
    device: object
    runtime: str
    protocol: Protocol
    work: Path
    store: object
    run_id: str | None
    rounds: int
    seed: int
    progress: Callable[[str], None]
    built: dict = field(default_factory=dict)
    batches: int = 0
    ref: object = None              # the quant.models.ModelRef, when not a plain name
    calib_data: str = "real"
    distill_iters: int = DISTILL_ITERS    # the search's, for its distilled artifacts too
    device_accuracy: dict = field(default_factory=dict)   # config key -> accuracy on the device
    graph: object = None            # quant.graph_route.GraphModel: an ONNX-route file

    @property
    def tag(self) -> str:
        return f"{self.model}-{self.device.name}-{self.runtime}"

    def bit_config(self, cfg: dict) -> BitConfig:
        from quant.sensitivity import config_from_allocation

        if self.graph is not None:
            return self.graph.bit_config({k: v for k, v in cfg.items() if v != FLOAT})
        return config_from_allocation(self.folded, {k: v for k, v in cfg.items() if v != FLOAT},
                                      act_bits=8)

    def artifact(self, cfg: dict):
        key = tuple(sorted(cfg.items()))
        if key not in self.built:
            if all(v == INT8 for v in cfg.values()):
                variant = INT8
            elif all(v == FLOAT for v in cfg.values()):
                variant = FLOAT
            else:
                variant = _write_config(self.work, f"{self.tag}-{len(self.built)}",
                                        self.bit_config(cfg))
            self.built[key] = runner.artifact_for(self.ref or self.model, variant, self.work,
                                                  self.runtime, seed=self.seed,
                                                  calib_data=self.calib_data,
                                                  distill_iters=self.distill_iters)
        return self.built[key]

    def accuracy(self, cfg: dict) -> dict:
        """A configuration's simulated accuracy as its artifact's manifest recorded it when
        it was built (built here if it was not; nothing is quantized twice): top-1 or
        agreement where the model outputs class scores, else its SQNR and the task figures
        of its outputs (a detector's agreement over a box tensor would mean nothing); a
        user's metric beside either."""
        sim = self.artifact(cfg).manifest.get("simulated") or {}
        figures = {k: sim[k] for k in ("task", "metric") if sim.get(k)}
        if sim.get("top1") is not None:
            fp32 = self._simulated(dict.fromkeys(self.layers, FLOAT)).get("top1")
            if fp32 is not None:
                return {"top1": sim["top1"], "fp32_top1": fp32, **figures}
        if sim.get("agreement_fp32") is not None:
            return {"agreement_fp32": sim["agreement_fp32"], **figures}
        if sim:
            return {k: sim[k] for k in ("sqnr_db", "task", "metric") if sim.get(k)}
        if self.graph is not None:
            return {}
        return _accuracy(self.entry, self.bit_config(cfg), self.calib_data)

    def _simulated(self, cfg: dict) -> dict:
        art = self.built.get(tuple(sorted(cfg.items())))
        return (art.manifest.get("simulated") or {}) if art is not None else {}

    def measure(self, configs: dict[str, dict]) -> dict[str, list[float]]:
        """Time configurations beside each other (alternating rounds, fresh processes,
        stored): each one's p50 per good round."""
        self.batches += 1
        named = {f"it{self.batches}-{n}": self.artifact(c) for n, c in configs.items()}
        ms = runner.measure_artifacts(self.device, self.runtime, self.model, named,
                                      self.protocol, rounds=self.rounds, store=self.store,
                                      run_id=self.run_id, kind="search",
                                      on_result=self.progress)
        for n, c in configs.items():
            acc = next((m.accuracy for m in ms[f"it{self.batches}-{n}"] if m.accuracy), None)
            if acc:
                self.device_accuracy[tuple(sorted(c.items()))] = acc
        return {n: _p50s(ms[f"it{self.batches}-{n}"]) for n in configs}


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
    from quant.models import load_model, name_of
    from quant.transform import fold_bn, quantizable_layers

    options.check()
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
    ctx = Context(name, entry, folded, layers, edges, device, runtime,
                   protocol, work, store, run_id, options.rounds, options.seed, progress,
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
    from quant.models import ModelRef
    from quant.onnx_artifact import route_of

    if not entry.onnx_path:
        return None
    ref = ref if isinstance(ref, ModelRef) else ModelRef(entry.name)
    route, why = route_of(entry, ref.route)
    if route != "onnx":
        return None
    if options.calib_data != "real":
        raise SpecError(f"--calib-data {options.calib_data}: the ONNX route ({why}) calibrates "
                        "on real inputs; give --data")
    from quant.graph_route import GraphModel
    from quant.onnx_feeds import load_feeds

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
        return _fastest_within(ctx, sens.by, costs.prior, sens.base_acc[FLOAT],
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


def measure_patterns(ctx: Context):
    """Time the profile patterns beside each other, then profile each: (tonight's timings
    name -> (config, p50 per round), the prior), or (None, why) when a baseline failed."""
    pats = latmodel.profile_patterns(ctx.layers)
    arts = {name: ctx.artifact(cfg) for name, cfg in pats.items()}
    ctx.progress(f"{ctx.model}: timing and profiling {len(pats)} patterns on "
                 f"{ctx.device.name}/{ctx.runtime}")
    timed = runner.measure_artifacts(ctx.device, ctx.runtime, ctx.model, arts, ctx.protocol,
                                     rounds=ctx.rounds, store=ctx.store, run_id=ctx.run_id,
                                     kind="search", on_result=ctx.progress)
    seeded = {n: (pats[n], _p50s(timed[n])) for n in pats}
    uniforms = ("uniform-" + INT8, "uniform-" + FLOAT)
    if not all(seeded[n][1] for n in uniforms):
        return None, "the uniform baselines failed on the device: " + "; ".join(
            m.reason or "" for n in uniforms for m in timed[n] if not m.ok)
    profiles = runner.profile_artifacts(ctx.device, ctx.runtime, ctx.model, arts, ctx.protocol,
                                        iters=PROFILE_ITERS, store=ctx.store, run_id=ctx.run_id,
                                        on_result=ctx.progress)
    have = [(n, profiles[n].profile) for n in pats if profiles[n].ok and profiles[n].profile]
    if not have:
        why = next((m.reason for m in profiles.values() if m.reason), "no profile")
        ctx.progress(f"{ctx.model}: no engine profile ({why}): a flat prior, the measurements "
                     "carry the fit")
        base = statistics.median(seeded["uniform-" + INT8][1])
        return seeded, latmodel.flat_prior(ctx.layers, ctx.edges, base)
    wall = {i: statistics.median(seeded[n][1]) for i, (n, _) in enumerate(have) if seeded[n][1]}
    return seeded, latmodel.prior_from_profiles(ctx.layers, ctx.edges,
                                                [(pats[n], p) for n, p in have], wall)


def _sensitivity(ctx: Context, net, method, calib_data, samples, distill_iters):
    """(sensitivity, size in bits) per (layer, precision) on real or data-free data."""
    from quant.sensitivity import sensitivity_table
    from quant.zeroq import calibration_data, input_prior

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


def figure(acc: dict, name: str) -> float | None:
    """A named figure of an accuracy dict: its own key, a task figure or a user metric."""
    for value in (acc.get(name), (acc.get("task") or {}).get(name),
                  (acc.get("metric") or {}).get(name)):
        if isinstance(value, int | float):
            return float(value)
    return None


def _loss(acc: dict, float_acc: dict, max_drop, min_agreement, drop_metric: str = "top1"
          ) -> tuple[float, float]:
    """(how far past the limit, the limit) in the limit's own unit: > 0 means it fails."""
    if max_drop is not None and drop_metric != "top1":
        now, base = figure(acc, drop_metric), figure(float_acc, drop_metric)
        if now is None or base is None:
            have = sorted({*(acc.get("task") or {}), *(acc.get("metric") or {})})
            raise SpecError(f"--max-drop {drop_metric}=...: the model reports no figure "
                            f"{drop_metric!r} (it reports: {', '.join(have) or 'none'})")
        return (base - now) - max_drop, max_drop
    if max_drop is not None:
        if "top1" not in acc:
            raise SpecError("--max-drop needs labelled data; this model has none "
                            "(use --min-agreement)")
        drop = 100 * (float_acc["top1"] - acc["top1"])
        return drop - max_drop, max_drop
    return min_agreement - acc.get("agreement_fp32", acc.get("top1", 0.0)), min_agreement


def _fastest_within(ctx: Context, sens_by, prior, float_acc, max_drop, min_agreement, result,
                    *, history, measured, z, tolerance, max_iters, limits, progress,
                    drop_metric: str = "top1"):
    """The fastest configuration whose measured accuracy stays within the limit: the least
    sensitive pick under a latency budget is the best one can do at that budget, so bisect
    the budget between the measured all-INT8 and all-float latencies, each candidate's
    accuracy measured, then close the loop on the budget found (its pick re-measured)."""
    q, f = (statistics.median(measured[f"uniform-{u}"][1]) for u in (INT8, FLOAT))
    obs = list(history) + latmodel.observations(measured)
    fit = latmodel.fit(ctx.layers, ctx.edges, prior, obs)
    seen = {o.name: o for o in obs}
    lo, hi = 0.0, 100.0            # % of the way from all-INT8 to all-float
    checked = []
    best = None
    for _ in range(BISECT_STEPS):
        pct = lo if not checked else (lo + hi) / 2
        cfg, _, _ = loop.choose(fit, sens_by, loop.resolve(f"{pct}%", q, f), z, seen, limits)
        if cfg is None:
            lo = pct
            continue
        acc = ctx.accuracy(cfg)
        over, limit = _loss(acc, float_acc, max_drop, min_agreement, drop_metric)
        checked.append({"budget_pct": pct, "float_layers": sum(v != INT8 for v in cfg.values()),
                        "accuracy": acc, "within_limit": over <= 0})
        progress(f"{ctx.model}: at {pct:.1f}% of the latency range the pick has "
                 f"{checked[-1]['float_layers']} float layers, accuracy {acc}: "
                 f"{'within' if over <= 0 else 'past'} the limit")
        if over <= 0:
            best, hi = pct, pct
            if pct == 0.0:
                break
        else:
            lo = pct
        if hi - lo < 100.0 / 2 ** (BISECT_STEPS - 1):
            break
    result.accuracy_checks = checked
    if best is None:
        best = 100.0      # all-float is the only sure answer; the loop measures it
    res = loop.close_loop(ctx.layers, ctx.edges, sens_by, prior, ctx.measure, f"{best}%",
                          history=history, measured=measured, z=z, tolerance=tolerance,
                          max_iters=max_iters, limits=limits, progress=progress)
    done = [it for it in res.iterations if it.measured_ms is not None]
    if res.status == "budget_missed" and done:
        # The latency budget here is the bisection's own aim, not the user's limit: missing
        # it by noise (a 13 µs network reads ±30%) leaves a measured pick whose accuracy,
        # the limit asked for, is checked next (`_check_accuracy_limit`).
        last = done[-1]
        res.config, res.predicted_ms, res.predicted_sd_ms = \
            last.config, last.predicted_ms, last.predicted_sd_ms
        res.measured_ms, res.measured_ci_ms = last.measured_ms, last.measured_ci_ms
        res.status = "ok"
        res.message = (f"the pick measured {res.measured_ms:.3g} ms, over the "
                       f"{res.budget_ms:.3g} ms the accuracy bisection aimed at ({res.message})")
    return res


def _sweep(ctx: Context, fit, sens_by, q_ms, f_ms, points, z, limits) -> list[dict]:
    """The latency-vs-accuracy frontier: the pick at `points` budgets from 0% to 100%,
    measured beside each other, each with its accuracy."""
    picks = {}
    for k in range(points):
        pct = 100.0 * k / (points - 1)
        cfg, _, _ = loop.choose(fit, sens_by, loop.resolve(f"{pct}%", q_ms, f_ms), z,
                                {o.name: o for o in fit.observations}, limits)
        if cfg is not None and cfg not in picks.values():
            picks[f"sweep-{pct:.0f}%"] = cfg
    ctx.progress(f"{ctx.model}: measuring {len(picks)} frontier points")
    got = ctx.measure(picks)
    out = []
    for name, cfg in picks.items():
        ps = got.get(name) or []
        bc = ctx.bit_config(cfg)
        acc = ctx.accuracy(cfg)
        mean, sd = fit.predict(cfg)
        measured = {"latency_ms": statistics.median(ps)} if ps else {}
        out.append({"name": name, "config": cfg, "predicted": {"latency_ms": mean,
                    "latency_sd_ms": sd}, "measured": measured, "accuracy": acc})
        if ctx.store is not None:
            ctx.store.add_allocation(ctx.run_id, ctx.model, ctx.device.name, ctx.runtime, name,
                                     budgets={}, config=bc.to_dict(),
                                     predicted=out[-1]["predicted"], measured=measured,
                                     accuracy=acc.get("top1"))
    return out


def _store_pick(ctx: Context, name: str, it, budgets: dict, result) -> None:
    """One iteration's pick (or the chosen one, with its accuracy and the search's status)."""
    if ctx.store is None:
        return
    predicted = {"latency_ms": it.predicted_ms, "latency_sd_ms": it.predicted_sd_ms,
                 "margin_ms": it.margin_ms}
    measured = {"latency_ms": it.measured_ms, "latency_ci_ms": it.measured_ci_ms,
                "latency_error": it.error, "latency_error_unscaled": it.raw_error,
                "speed": it.speed, "within_budget": it.within_budget}
    if result is not None:
        measured.update(search_status=result.status, iterations=len(result.iterations),
                        message=result.message)
    ctx.store.add_allocation(ctx.run_id, ctx.model, ctx.device.name, ctx.runtime, name,
                             budgets=budgets, config=ctx.bit_config(it.config).to_dict(),
                             predicted=predicted,
                             measured={k: v for k, v in measured.items() if v is not None},
                             accuracy=result.accuracy.get("top1") if result is not None else None,
                             variant=result.variant if result is not None else None)


def float_edges(model, layers: list[str]) -> list[tuple[str, str]]:
    """(producer, consumer) pairs of quantizable layers joined by a tensor path through
    non-quantizable ops only (ReLU, pooling, residual adds, flatten): where a Q/DQ pair sits
    between two INT8 layers and none between two float ones."""
    import torch.fx as fx

    from quant.transform import layer_graph

    graph = layer_graph(model)
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


