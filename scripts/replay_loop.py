"""Replay stored searches through the latency model: how well each pick was predicted from
everything measured before it, with and without putting each batch on one scale.

    python scripts/replay_loop.py --db results/hilq.sqlite --model mobilenet_v2 --runtime ort
        [--device local]

Every search stores its profiles, its pattern timings and each iteration's batch (the pick
beside the uniforms; `it<N>-*` variants). This refits the model offline, night after night as
the search would (earlier nights as history), and predicts each configuration the first time
a batch measured it (picks, and `heldout-*` mixes of scripts/closed_loop_real.py). No device
is needed: a change to `bench.latmodel` can be judged on every measurement already stored.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import latmodel, loop  # noqa: E402
from bench.latmodel import FLOAT, INT8  # noqa: E402
from bench.search import batch_of, float_edges, precisions_of  # noqa: E402
from bench.store import open_store  # noqa: E402


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
        past = loop._onto(history, latmodel.observations({"q": base["uniform-" + INT8]})[0])
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--device", default="local")
    args = ap.parse_args(argv)
    from quant.models import load_model
    from quant.transform import fold_bn, quantizable_layers

    try:
        folded = fold_bn(load_model(args.model).build().eval())
    except (ValueError, KeyError) as e:
        print(f"replay_loop: {e}", file=sys.stderr)
        return 2
    layers = quantizable_layers(folded)
    edges = float_edges(folded, layers)
    runs = nights(open_store(args.db), args.model, args.device, args.runtime, layers)
    print(f"{args.model} on {args.device}/{args.runtime}: {len(runs)} stored search(es)\n")
    print("| batches | kind | n | median abs error | max abs error | median error |")
    print("|---|---|---|---|---|---|")
    for scaled in (False, True):
        errors: dict[str, list[float]] = {}
        for r in replay(layers, edges, runs, scaled):
            errors.setdefault("heldout" if r["name"].startswith("heldout") else "pick", []).append(
                (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
        for kind, e in errors.items():
            a = [abs(x) for x in e]
            print(f"| {'on one scale' if scaled else 'as read'} | {kind} | {len(e)} | "
                  f"{100 * statistics.median(a):.1f}% | {100 * max(a):.1f}% | "
                  f"{100 * statistics.median(e):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
