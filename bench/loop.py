"""The closed loop: predict with a margin, solve, re-measure, refit, until the pick holds.

The search is written against two callables so that the same loop runs on a real device and
on the simulated one (`bench.simulate`): `measure(configs)` times named configurations
(beside each other, alternating, fresh processes) and returns each one's p50 per round;
the latency model (`bench.latmodel`) is refitted from everything measured so far.

Each iteration:
1. solve the ILP on the model's mean costs under `budget − margin`, the margin being z × the
   pick's own prediction sd (a fixed point: the margin depends on the pick it selects), so a
   pick is never bought with noise;
2. measure the pick beside the uniform baselines, with more rounds (up to `max_repeats`
   batches) while its confidence interval is wider than the tolerance: noise decides the
   number of repeats, not a fixed count;
3. accept when it meets the budget within its measurement's confidence interval and the
   prediction agrees with the measurement within the tolerance; otherwise add the
   measurements to the fit and go again, up to `max_iters`.
A search whose every pick missed ends `budget_missed`; one whose measured pick is within
budget but whose model never agreed within tolerance still ends ok (the pick was measured),
with the disagreement noted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from hilq.quant.allocate import CostTable, solve_ilp

from . import latmodel
from .latmodel import FLOAT, INT8, LatencyModel, Observation, Prior

CONFIDENCE = 0.95    # one-sided: that the pick's prediction + margin meets the budget
Z_MARGIN = round(statistics.NormalDist().inv_cdf(CONFIDENCE), 3)   # 1.645
Z_CI = 1.96          # two-sided 95% interval of a measured p50
TOLERANCE = 0.05     # |predicted − measured| / measured above which the model is refitted
MAX_ITERS = 3
MAX_REPEATS = 3      # extra batches of rounds for a pick whose CI is wider than the tolerance

Measure = Callable[[dict[str, dict[str, str]]], dict[str, list[float]]]


class SearchFailure(ValueError):
    """The numbers a search rests on are unusable (a NaN cost after a failed run): that
    search fails, typed and in one line; the caller (a nightly) goes on."""


@dataclass
class Iteration:
    index: int
    config: dict
    predicted_ms: float
    predicted_sd_ms: float
    margin_ms: float
    measured_ms: float | None = None
    measured_ci_ms: float | None = None
    error: float | None = None          # (predicted − measured) / measured
    within_budget: bool = False
    agrees: bool = False
    speed: float = 1.0                  # the machine's speed in this batch relative to the
    #                                     budget's (`latmodel.on_one_scale`), from the uniforms
    raw_error: float | None = None      # (predicted − measured) / measured, speed not applied
    uniform_ms: dict = field(default_factory=dict)   # the baselines measured beside it
    loo_median_abs: float | None = None  # the model's leave-one-out error before this solve
    note: str = ""


@dataclass
class LoopResult:
    status: str                # ok | budget_missed | infeasible | failed
    budget_ms: float
    config: dict = field(default_factory=dict)
    predicted_ms: float | None = None
    predicted_sd_ms: float | None = None
    measured_ms: float | None = None
    measured_ci_ms: float | None = None
    iterations: list[Iteration] = field(default_factory=list)
    message: str = ""
    model: LatencyModel | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model")
        d["model"] = self.model.summary() if self.model is not None else None
        return d


def uniform(layers, precision: str) -> dict[str, str]:
    return dict.fromkeys(layers, precision)


BUDGETS = ("latency_ms", "size_bits")   # what the search holds a pick to (size is counted
#                                         exactly; an energy model is not built yet)


def parse_budget(key: str, value) -> float | str:
    """A budget as a user writes it, checked: a positive number, or "NN%" of the way from the
    all-INT8 to the all-float figure. ValueError names the problem (the CLI and the nightly
    config add where it was written)."""
    if key not in BUDGETS:
        raise ValueError(f"unknown budget {key!r} (use {', '.join(BUDGETS)})")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"{value!r}: relative budgets run from 0% to 100%")
        return value.strip()
    try:
        v = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number or 'NN%'") from None
    if not v > 0 or v == float("inf"):
        raise ValueError(f"{value!r}: a budget must be a positive number or 'NN%'")
    return v


def resolve(budget, int8_ms: float, float_ms: float) -> float:
    """"NN%" -> ms between the *measured* all-INT8 (0%) and all-float (100%) latencies; a
    number passes through."""
    if isinstance(budget, str):
        pct = float(budget.rstrip("%"))
        lo, hi = min(int8_ms, float_ms), max(int8_ms, float_ms)
        return lo + pct / 100.0 * (hi - lo)
    return float(budget)


def ci_ms(ob: Observation) -> float:
    return Z_CI * ob.se_ms


Limits = Mapping[str, tuple[Mapping[tuple[str, str], float], float]]


def cost_table(model: LatencyModel, sensitivity: Mapping[tuple[str, str], float],
               limits: Limits | None = None) -> CostTable:
    """The model's mean costs as an ILP table, with exact columns (size) for `limits`."""
    rows, pairs = model.costs()
    limits = limits or {}
    # KL sensitivities of 8-bit layers are ~1e-6: below HiGHS's tolerances every pick would
    # tie. Scaled so that they sum to 1 (the objective's order is unchanged).
    total = sum(v for v in sensitivity.values() if v > 0) or 1.0
    try:
        return CostTable.from_rows(
            {"layer": lay, "precision": p,
             "sensitivity": float(sensitivity.get((lay, p), 0.0)) / total,
             "latency_ms": v, **{c: float(costs[(lay, p)]) for c, (costs, _) in limits.items()}}
            for (lay, p), v in rows.items()).with_pairs(pairs)
    except ValueError as e:
        raise SearchFailure(f"the latency model's {e}") from None


def choose(model: LatencyModel, sensitivity: Mapping[tuple[str, str], float], budget_ms: float,
           z: float = Z_MARGIN, measured: Mapping[str, Observation] | None = None,
           limits: Limits | None = None, steps: int = 8) -> tuple[dict | None, float, str]:
    """The least sensitive configuration whose prediction + z·sd meets the budget (and
    whose exact columns meet `limits`): (config, margin used, message). Configurations
    already measured within the budget (their measured upper CI bound; the fastest one, its
    median) are admissible."""
    table = cost_table(model, sensitivity, limits)
    others = {c: b for c, (_, b) in (limits or {}).items()}

    def fits(cfg):
        return all(table.total(cfg, c) <= b * (1 + 1e-9) for c, b in others.items())

    def sens(cfg):
        return table.total(cfg, "sensitivity")

    best, best_margin = None, 0.0
    # one verdict per configuration, from all its measurements: judged one at a time, the
    # one that happened to read low (an earlier night's, say) admits a configuration its
    # newer measurements put over the budget, and the loop picks it again and again
    obs = pooled((measured or {}).values())
    # the fastest measured uniform configuration is the floor the budget was resolved from: at or
    # above its measured latency a budget is never refused (re-measuring it decides)
    floor = min((o for o in obs if len(set(o.config.values())) == 1),
                key=lambda o: o.latency_ms, default=None)
    for ob in obs:
        upper = ob.latency_ms + (0.0 if ob is floor else ci_ms(ob))
        if upper <= budget_ms and fits(ob.config) and \
                (best is None or sens(ob.config) < sens(best)):
            best = dict(ob.config)
    # the margin: the smallest that makes the ILP's pick hold at confidence (a smaller one
    # buys a more accurate pick). Not monotone enough for a fixed point (it can cycle), so a
    # grid over [0, budget − all-INT8 mean], then bisection where the grid first holds.
    picked: dict[float, tuple[dict | None, bool]] = {}

    def holds(margin: float) -> bool:
        alloc = solve_ilp(table, {"latency_ms": budget_ms - margin, **others})
        ok = False
        if alloc.ok:
            mean, sd = model.predict(alloc.config)
            ok = mean + z * sd <= budget_ms * (1 + 1e-9)
        picked[margin] = (dict(alloc.config) if alloc.ok else None, ok)
        return ok

    span = max(0.0, budget_ms - model.predict(dict.fromkeys(model.layers, INT8))[0])
    grid = [span * k / steps for k in range(steps + 1)]
    first = next((k for k, m in enumerate(grid) if holds(m)), None)
    if first:
        lo, hi = grid[first - 1], grid[first]
        for _ in range(6):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    margin = 0.0
    for m, (cfg, ok) in sorted(picked.items()):
        if ok and (best is None or sens(cfg) < sens(best) - 1e-12):
            best, best_margin = cfg, m
    if best is None:
        return None, margin, (f"no configuration is predicted under {budget_ms:.3g} ms with "
                              f"{_confidence(z)} confidence")
    return best, best_margin, ""


def pooled(observations) -> list[Observation]:
    """One Observation per configuration: the random-effects (DerSimonian–Laird) mean of its
    measurements. Measurements from different processes and nights disagree by more than
    each one's own error says; the between-measurement variance τ² they show is added to
    every one's, so one confident low reading cannot outvote the rest."""
    groups: dict[tuple, list[Observation]] = {}
    for ob in observations:
        groups.setdefault(tuple(sorted(ob.config.items())), []).append(ob)
    out = []
    for obs in groups.values():
        if len(obs) == 1:
            out.append(obs[0])
            continue
        x = [o.latency_ms for o in obs]
        w = [1.0 / max(o.se_ms, 1e-9) ** 2 for o in obs]
        fixed = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
        q = sum(wi * (xi - fixed) ** 2 for wi, xi in zip(w, x))
        tau2 = max(0.0, (q - (len(x) - 1)) / (sum(w) - sum(wi * wi for wi in w) / sum(w)))
        w = [1.0 / (max(o.se_ms, 1e-9) ** 2 + tau2) for o in obs]
        mean = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
        out.append(Observation(obs[0].config, mean, sum(w) ** -0.5,
                               "+".join(o.name for o in obs)))
    return out


def _confidence(z: float) -> str:
    return f"{100 * statistics.NormalDist().cdf(z):.0f}%"


def close_loop(layers, edges, sensitivity: Mapping[tuple[str, str], float], prior: Prior,
               measure: Measure, budget, *, history: list[Observation] = (),
               measured: Mapping[str, tuple[Mapping[str, str], list[float]]] | None = None,
               z: float = Z_MARGIN, tolerance: float = TOLERANCE,
               max_iters: int = MAX_ITERS, limits: Limits | None = None,
               max_repeats: int = MAX_REPEATS, progress: Callable[[str], None] = lambda s: None) -> LoopResult:
    """The whole loop for one latency budget (ms, or "NN%" between the measured uniforms).
    `history` are earlier measurements of this model on this device and runtime (fixed
    observations); `measured` what tonight already measured, name -> (config, p50 per round),
    e.g. the profiled patterns' timed runs: its `uniform-*` entries stand in for the first
    measurement of the baselines. Unusable numbers end it `failed` (SearchFailure's message)."""
    try:
        return _close_loop(layers, edges, sensitivity, prior, measure, budget, history=history,
                           measured=measured, z=z, tolerance=tolerance, max_iters=max_iters,
                           limits=limits, max_repeats=max_repeats, progress=progress)
    except SearchFailure as e:
        return LoopResult("failed", math.nan, message=str(e))


@dataclass
class _Rounds:
    """Every p50 per round measured so far, by `<batch>:<name>` (batch 0: tonight's seeded
    patterns and the first baselines), and earlier nights moved onto tonight's scale."""

    measure: Measure
    rounds: dict
    past: list = field(default_factory=list)

    def take(self, names: dict[str, dict], tag: str) -> dict[str, Observation]:
        """Measure `names` (more rounds, if `tag` already has some) and observe them, as
        the device read them (not rescaled)."""
        for name, ps in self.measure(names).items():
            if ps:
                self.rounds.setdefault(f"{tag}{name}", (names[name], []))[1].extend(ps)
        obs = {o.name: o for o in latmodel.observations(self.rounds)}
        return {name: obs[f"{tag}{name}"] for name in names if f"{tag}{name}" in obs}

    def data(self) -> tuple[list[Observation], dict[str, float]]:
        """Everything measured, on the scale of the batch the budget was resolved in."""
        tonight, speed = latmodel.on_one_scale(self.rounds, "0")
        return self.past + tonight, speed


@dataclass(frozen=True)
class _Settings:
    z: float
    tolerance: float
    max_iters: int
    limits: Limits | None
    max_repeats: int
    progress: Callable[[str], None]


def _close_loop(layers, edges, sensitivity, prior, measure, budget, *, history, measured, z,
                tolerance, max_iters, limits, max_repeats, progress) -> LoopResult:
    layers, edges = tuple(layers), tuple(edges)
    how = _Settings(z, tolerance, max_iters, limits, max_repeats, progress)
    uniforms = {"uniform-" + INT8: uniform(layers, INT8),
                "uniform-" + FLOAT: uniform(layers, FLOAT)}
    rounds = _Rounds(measure, {f"0:{n}": (dict(c), list(ps))
                               for n, (c, ps) in (measured or {}).items() if ps})
    first = _baselines(rounds, uniforms)
    if first is None:
        return LoopResult("failed", math.nan, message="the uniform baselines failed on the device")
    int8_first, float_first = first
    rounds.past = onto(history, int8_first)
    budget_ms = resolve(budget, int8_first.latency_ms, float_first.latency_ms)
    result = LoopResult("failed", budget_ms)
    result.message = _below_fastest(budget_ms, int8_first, float_first)
    if result.message:
        result.status = "infeasible"
        return result
    for it in range(1, max_iters + 1):
        obs, _ = rounds.data()
        result.model = latmodel.fit(layers, edges, prior, obs)
        cfg, margin, why = choose(result.model, sensitivity, budget_ms, z,
                                  {o.name: o for o in obs}, limits)
        if cfg is None:
            if _ends_without_pick(result, it, why, int8_first):
                return result
            # an earlier pick was measured within budget: the refit only found no better
            # one it is confident of, so that measured pick stands (below)
            progress(f"iteration {it}: {why}; keeping the pick measured within budget")
            break
        step = _try_pick(rounds, it, cfg, result.model, margin, uniforms, budget_ms, how)
        result.iterations.append(step)
        if step.within_budget and step.agrees:
            break
    result.model = latmodel.fit(layers, edges, prior, rounds.data()[0])
    return _conclude(result, sensitivity, tolerance, int8_first)


def _baselines(rounds: _Rounds, uniforms: dict) -> tuple[Observation, Observation] | None:
    """(all-INT8, all-float) as first measured: tonight's seeded rounds, else timed now."""
    seeded = {o.name: o for o in latmodel.observations(rounds.rounds)}
    first = {n: seeded["0:" + n] for n in uniforms if "0:" + n in seeded}
    if len(first) < 2:
        first = rounds.take(uniforms, "0:")
    if len(first) < 2:
        return None
    return first["uniform-" + INT8], first["uniform-" + FLOAT]


def _below_fastest(budget_ms: float, int8_first: Observation, float_first: Observation) -> str:
    """Why no configuration can meet the budget, or "" when one may."""
    fastest = min(int8_first, float_first, key=lambda o: o.latency_ms)
    if budget_ms >= fastest.latency_ms - ci_ms(fastest):
        return ""
    return (f"budget {budget_ms:.3g} ms is below the fastest measured configuration "
            f"({'all-INT8' if fastest is int8_first else 'all-float'} "
            f"{fastest.latency_ms:.3g} ± {ci_ms(fastest):.2g} ms)")


def _ends_without_pick(result: LoopResult, it: int, why: str, int8_first: Observation) -> bool:
    """No configuration is predicted within budget: on the first iteration the budget is
    infeasible; later, the search missed unless an earlier pick was measured within it."""
    if it == 1:
        result.status, result.message = "infeasible", why
        return True
    if not any(s.within_budget for s in result.iterations):
        result.status = "budget_missed"
        if result.iterations:
            _stand(result, _closest_miss(result.iterations))
        result.message = "; ".join(m for m in (
            f"after {it - 1} iteration(s): {why}", _slowdown(int8_first, result.iterations))
            if m)
        return True
    return False


def _try_pick(rounds: _Rounds, it: int, cfg: dict, model: LatencyModel, margin: float,
              uniforms: dict, budget_ms: float, how: _Settings) -> Iteration:
    """Measure the pick beside the uniforms (again while its CI is wider than the
    tolerance) and judge it against the budget and its prediction."""
    mean, sd = model.predict(cfg)
    step = Iteration(it, cfg, mean, sd, margin)
    how.progress(f"iteration {it}: pick {sum(v != INT8 for v in cfg.values())} of {len(cfg)} "
                 f"layers float, predicted {mean:.3f} ± {sd:.3f} ms (margin {margin:.3f}), "
                 f"budget {budget_ms:.3f} ms")
    batch = {"pick": cfg, **uniforms}
    got = rounds.take(batch, f"{it}:")
    for _ in range(how.max_repeats):   # too noisy to decide: more rounds, not a verdict
        pick = got.get("pick")
        if pick is None or ci_ms(pick) <= how.tolerance * pick.latency_ms:
            break
        how.progress(f"iteration {it}: ±{ci_ms(pick):.3f} ms is wider than the tolerance: "
                     "measuring again")
        got = rounds.take(batch, f"{it}:")
    pick = got.get("pick")
    step.uniform_ms = {n: o.latency_ms for n, o in got.items() if n != "pick"}
    if pick is None:
        step.note = "the pick failed on the device"
        return step
    step.measured_ms, step.measured_ci_ms = pick.latency_ms, ci_ms(pick)
    # the prediction is for the machine as it ran when the budget was resolved; the
    # uniforms measured beside the pick say how fast it runs now. The budget stays
    # absolute: a machine that slows down (a CPU hog) misses it, and says so.
    step.speed = rounds.data()[1].get(str(it), 1.0)
    expect = mean * step.speed
    step.error = (expect - pick.latency_ms) / pick.latency_ms
    step.raw_error = (mean - pick.latency_ms) / pick.latency_ms
    step.within_budget = pick.latency_ms <= budget_ms + step.measured_ci_ms
    step.agrees = abs(expect - pick.latency_ms) <= max(how.tolerance * pick.latency_ms,
                                                       step.measured_ci_ms)
    how.progress(f"iteration {it}: measured {pick.latency_ms:.3f} ± {step.measured_ci_ms:.3f} "
                 f"ms (error {100 * step.error:+.1f}% at this batch's speed "
                 f"{step.speed:.3f}; {100 * step.raw_error:+.1f}% unscaled), "
                 f"{'within' if step.within_budget else 'MISSED'} budget")
    return step


def _conclude(result: LoopResult, sensitivity, tolerance: float,
              int8_first: Observation) -> LoopResult:
    """The pick that stands, the status and the notes. A pick measured under the budget
    beats one only within its CI of it; of one configuration picked twice, its latest
    measurement (the search reports that one)."""
    budget_ms = result.budget_ms
    latest = {tuple(sorted(s.config.items())): s for s in result.iterations}
    good = [s for s in latest.values() if s.within_budget]
    final = min(good, key=lambda s: (s.measured_ms > budget_ms, sum(
        sensitivity.get((k, v), 0.0) for k, v in s.config.items()), -s.index)) \
        if good else _closest_miss(result.iterations)
    _stand(result, final)
    if good:
        result.status = "ok"
        if not final.agrees:
            result.message = (f"the pick meets the budget but its prediction missed by "
                              f"{100 * abs(final.error):.1f}% (tolerance {100 * tolerance:.0f}%)")
    else:
        result.status = "budget_missed"
        last = result.iterations[-1]
        result.message = (f"budget {budget_ms:.3g} ms missed after {len(result.iterations)} "
                          f"iteration(s): the last pick measured "
                          + (f"{last.measured_ms:.3g} ± {last.measured_ci_ms:.2g} ms"
                             if last.measured_ms is not None else "nothing (it failed)"))
    notes = (_slowdown(int8_first, result.iterations), _too_noisy(final, tolerance))
    result.message = "; ".join(m for m in (result.message, *notes) if m)
    return result


def _closest_miss(iterations: list[Iteration]) -> Iteration:
    """Of picks that all missed the budget, the fastest measured: what a user who must ship
    would take (the last one, when none was measured)."""
    tried = [s for s in iterations if s.measured_ms is not None]
    return min(tried, key=lambda s: s.measured_ms) if tried else iterations[-1]


def _stand(result: LoopResult, step: Iteration) -> None:
    """Make `step`'s pick the search's result."""
    result.config, result.predicted_ms, result.predicted_sd_ms = \
        step.config, step.predicted_ms, step.predicted_sd_ms
    result.measured_ms, result.measured_ci_ms = step.measured_ms, step.measured_ci_ms


def onto(history: list[Observation], int8_now: Observation) -> list[Observation]:
    """Earlier nights' observations (on the scale of the newest of them: `search.history`)
    moved onto tonight's, by tonight's all-INT8 baseline over theirs."""
    theirs = [o for o in pooled(history) if set(o.config.values()) == {INT8}]
    if not theirs or not theirs[0].latency_ms > 0:
        return list(history)
    s = int8_now.latency_ms / theirs[0].latency_ms
    return [Observation(o.config, s * o.latency_ms, s * o.se_ms, o.name) for o in history]


def _too_noisy(final: Iteration, tolerance: float) -> str:
    """A note when the pick's own measurement, after every repeat, is wider than the
    tolerance: the prediction cannot be checked more closely than the device repeats itself.
    On a small CPU that can be the engine's threads meeting the rest of the machine on every
    core (a 2-core Zen 5 VM at 2 threads ran MobileNetV2's rounds at CV 13–16%, two speeds by
    process; at 1 thread, 2–3%); on another VM one thread did not help (README, "Noise")."""
    if final.measured_ms is None or final.measured_ci_ms is None \
            or final.measured_ci_ms <= tolerance * final.measured_ms:
        return ""
    return (f"the pick's measurement stayed ±{100 * final.measured_ci_ms / final.measured_ms:.0f}% "
            f"(95% CI) after every repeat, wider than the {100 * tolerance:.0f}% tolerance: the "
            "device's own run-to-run noise bounds the check (on some small CPUs fewer engine "
            "threads than cores, e.g. --threads 1, steadies it)")


def _slowdown(int8_first: Observation, iterations: list[Iteration], limit: float = 0.1) -> str:
    """A note when the all-INT8 baseline, re-measured beside the picks, ran more than
    `limit` (and its CI) slower than when the budget was resolved: the machine changed."""
    later = [it.uniform_ms.get("uniform-" + INT8) for it in iterations]
    later = [v for v in later if v]
    if not later:
        return ""
    worst = max(later)
    if worst > int8_first.latency_ms * (1 + limit) + 2 * ci_ms(int8_first):
        return (f"the machine ran {100 * (worst / int8_first.latency_ms - 1):.0f}% slower during the "
                f"search (all-INT8 {int8_first.latency_ms:.3g} ms, then {worst:.3g} ms): busy?")
    return ""
