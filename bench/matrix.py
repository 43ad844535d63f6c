"""One device's part of the bench matrix: every (model, runtime) task measured in rounds,
extra rounds where a series cannot yet see the effect the night must detect, one summary row
per variant. The thread engine (`nightly`) and the Ray farm (`farm`) both run this loop.
"""

from __future__ import annotations

import time
from dataclasses import replace

from hilq.devices.errors import DeviceError

from . import runner
from .config import Bench, Config


def series_mde(cfg: Config, store, run_id: str, key: tuple, tonight: list[float]
               ) -> tuple[float | None, float | None, int]:
    """(minimum detectable effect, round noise σ, history rounds) of one p50 series with
    tonight's per-round values, against the history the regression rule will use."""
    from . import regress

    hist = store.history(*key, "p50", cfg.lookback, before_run=run_id)
    groups = [h["rounds"] for h in hist]
    sigma = regress.round_noise([*groups, tonight])
    m = sum(len(g) for g in groups)
    return (regress.minimum_detectable_effect(sigma, len(tonight), m,
                                              threshold=cfg.regression_threshold),
            sigma, m)


def protocol_for(cfg: Config, b, runtime: str):
    """The night's protocol with this entry's settings of `runtime`'s engine."""
    return replace(cfg.protocol, runtime_options=b.runtime_options.get(runtime, {}))


def adaptive_rounds(cfg: Config, store, run_id, device, b, runtime, arts, per, say,
                     budget_s: float) -> tuple[dict, float]:
    """More rounds for the series that cannot yet see `cfg.detect`, alternating among them,
    until each can, `max_rounds` is reached or `budget_s` (what is left of the device's
    extra time tonight) is spent. Returns the series and the seconds spent. Each extra
    round is stored like the first ones (a killed run resumes them)."""
    t0 = time.perf_counter()
    k = cfg.rounds
    while k < cfg.max_rounds:
        lagging = []
        for name, ms in per.items():
            tonight = [m.latency_ms["p50"] for m in ms if m.ok and m.latency_ms.get("p50")]
            mde, sigma, hist = series_mde(cfg, store, run_id, (b.model, name, device.name,
                                                                runtime), tonight)
            if hist and mde is not None and mde > cfg.detect:
                lagging.append(name)
        spent = time.perf_counter() - t0
        per_round = spent / max(1, k - cfg.rounds) if k > cfg.rounds else 0.0
        if not lagging or spent + per_round > budget_s:
            break
        say(f"{b.model} on {device.name}/{runtime}: round {k + 1} for {', '.join(lagging)} "
            f"(cannot yet see {cfg.detect:.0%})")
        more = runner.measure_artifacts(device, runtime, b.model, {n: arts[n] for n in lagging},
                                        protocol_for(cfg, b, runtime), rounds=k + 1,
                                        store=store, run_id=run_id,
                                        kind="bench", on_result=say)
        per = {**per, **more}
        k += 1
    return per, time.perf_counter() - t0


def bench_device(cfg: Config, store, run_id: str, device, tasks: list[tuple[Bench, str, dict]],
                  say) -> tuple[list, list]:
    rows, failures = [], []
    left = cfg.detect_budget_s          # one budget of extra rounds per device and night
    for b, runtime, arts in tasks:
        try:
            per = runner.measure_artifacts(device, runtime, b.model, arts,
                                           protocol_for(cfg, b, runtime),
                                           rounds=cfg.rounds, store=store, run_id=run_id,
                                           kind="bench", on_result=say)
        except DeviceError as e:
            failures.append((f"{b.model} on {device.name}/{runtime}", f"{e.kind}: {e}"))
            continue
        if cfg.detect is not None:
            per, spent = adaptive_rounds(cfg, store, run_id, device, b, runtime, arts, per,
                                          say, left)
            left = max(0.0, left - spent)
        for name, ms in per.items():
            m = runner.combine(ms, cfg.seed)
            rows.append({"model": b.model, "variant": name, "device": device.name,
                         "runtime": runtime, "status": m.status, "failure": m.failure,
                         "p50_ms": (m.latency_ms or {}).get("p50"),
                         "cv_p50": (m.rounds or {}).get("cv_p50"), "reason": m.reason})
            if not m.ok:
                failures.append((f"{b.model} {name} on {device.name}/{runtime}",
                                 f"{m.failure}: {m.reason}"))
            elif m.scenario and not m.scenario.get("valid"):
                failures.append((f"{b.model} {name} on {device.name}/{runtime} "
                                 f"{m.scenario.get('scenario')}", "LoadGen INVALID: "
                                 + "; ".join(m.scenario.get("reasons") or [])))
    return rows, failures
