"""The accuracy side of a search: the fastest configuration within an accuracy limit
(bisection over the latency range, each candidate's figures measured), and the
latency-vs-accuracy frontier (`--sweep`).
"""

from __future__ import annotations

import statistics

from hilq.quant.spec import SpecError

from . import latmodel, loop
from .latmodel import FLOAT, INT8
from .search_context import Context

BISECT_STEPS = 6       # accuracy-limited search: candidates whose accuracy is measured


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


def fastest_within(ctx: Context, sens_by, prior, float_acc, max_drop, min_agreement, result,
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
    if best is None:      # only the model as it is keeps within the limit
        return _all_float(ctx, fit, obs)
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


def _all_float(ctx: Context, fit, obs) -> loop.LoopResult:
    """The answer when no configuration with INT8 layers keeps within the limit: all-float,
    which loses nothing by definition, as measured beside the others; not a loop aimed at
    the all-float latency, whose confidence margin no configuration under it could meet."""
    cfg = loop.uniform(ctx.layers, FLOAT)
    mean, sd = fit.predict(cfg)
    ob = next(o for o in reversed(obs) if o.name == f"uniform-{FLOAT}")
    error = (mean - ob.latency_ms) / ob.latency_ms
    step = loop.Iteration(1, cfg, mean, sd, 0.0, ob.latency_ms, loop.ci_ms(ob), error,
                          within_budget=True, agrees=True, raw_error=error,
                          note="the all-float baseline, as measured beside the others")
    return loop.LoopResult(
        "ok", ob.latency_ms, config=cfg, predicted_ms=mean, predicted_sd_ms=sd,
        measured_ms=ob.latency_ms, measured_ci_ms=step.measured_ci_ms, iterations=[step],
        model=fit, message="no configuration with INT8 layers keeps within the limit: the "
                           "model as it is (all float) is the fastest that does")


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



