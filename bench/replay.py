"""Replay stored searches through the latency model: how well each pick was predicted from
everything measured before it, with and without putting each batch on one scale
(`hilq search --replay`).

Every search stores its profiles, its pattern timings and each iteration's batch (the pick
beside the uniforms; `it<N>-*` variants). This refits the model offline, night after night as
the search would (earlier nights as history), and predicts each configuration the first time
a batch measured it (picks, and `heldout-*` mixes of experiments/closed_loop_real.py). No
device is needed: a change to `bench.latmodel` can be judged on every measurement stored.
"""

from __future__ import annotations

import statistics

from . import latmodel, loop
from .latmodel import FLOAT, INT8
from .search_context import batch_of, precisions_of


def nights(store, model, device, runtime, layers) -> dict[str, dict]:
    """run -> {"profiles": {pattern: (config, profile)},
    "batches": {batch: {variant: (config, p50 per round)}}}; batch "0" is the patterns,
    "N" the search's N-th measurement (`it<N>-*`)."""
    out: dict[str, dict] = {}
    for p in store.profiles(model, device, runtime):
        cfg = precisions_of(p["bit_config"], layers)
        if cfg is not None:
            out.setdefault(p["run_id"], {"profiles": {}, "batches": {}})["profiles"][
                p["variant"]] = (cfg, p["profile"])
    for r in store.config_latencies(model, device, runtime):
        cfg = precisions_of(r["bit_config"], layers)
        if r["run_id"] not in out or cfg is None or r["kind"] != "search":
            continue
        batch, name = batch_of(r["variant"])
        out[r["run_id"]]["batches"].setdefault(batch, {}).setdefault(
            name, (cfg, []))[1].append(r["p50_ms"])
    return out


def replay(layers, edges, runs: dict[str, dict], scaled: bool) -> list[dict]:
    """Each configuration predicted before the first batch that measured it, and measured
    over every batch that did: run, batch, name, predicted_ms, measured_ms."""
    out = []
    history: list[latmodel.Observation] = []
    pats = latmodel.profile_patterns(layers)

    def observe(rounds):
        return latmodel.on_one_scale(rounds)[0] if scaled else latmodel.observations(rounds)

    for run_id, run in runs.items():
        have = [n for n in pats if n in run["profiles"]]
        base = run["batches"].get("0", {})
        if not have or not all("uniform-" + p in base for p in (INT8, FLOAT)):
            continue
        wall = {i: statistics.median(base[n][1]) for i, n in enumerate(have) if n in base}
        prior = latmodel.prior_from_profiles(layers, edges, [run["profiles"][n] for n in have],
                                             wall)
        past = loop.onto(history, latmodel.observations({"q": base["uniform-" + INT8]})[0])
        every = {f"{b}:{n}": v for b, batch in run["batches"].items() for n, v in batch.items()}
        speed = latmodel.on_one_scale(every)[1] if scaled else {}
        measured: dict[tuple, list[float]] = {}
        for name, (cfg, ps) in every.items():
            measured.setdefault(tuple(sorted(cfg.items())), []).extend(
                p / speed.get(name.split(":", 1)[0], 1.0) for p in ps)
        rounds = {f"0:{n}": v for n, v in base.items()}
        for b in sorted((b for b in run["batches"] if b != "0"), key=int):
            fit = latmodel.fit(layers, edges, prior, past + observe(rounds))
            for n, (cfg, _) in run["batches"][b].items():
                key = tuple(sorted(cfg.items()))
                if not n.startswith("uniform-") and key in measured:
                    out.append({"run": run_id, "batch": b, "name": n,
                                "predicted_ms": fit.predict(cfg)[0],
                                "measured_ms": statistics.median(measured.pop(key))})
            rounds.update({f"{b}:{n}": v for n, v in run["batches"][b].items()})
        history = past + observe(rounds)
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Relative errors of `replay`'s rows by kind (pick | heldout): n, median and max
    absolute error, median signed error."""
    errors: dict[str, list[float]] = {}
    for r in rows:
        errors.setdefault("heldout" if r["name"].startswith("heldout") else "pick", []).append(
            (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
    return [{"kind": kind, "n": len(e), "median_abs": statistics.median(map(abs, e)),
             "max_abs": max(map(abs, e)), "median": statistics.median(e)}
            for kind, e in errors.items()]
