"""The closed loop on the simulated device: how often the final pick is within budget.

    python -m experiments.sim_loop [--trials 200] [--layers 21] [--noise 1,3]

For each noise level (a multiple of the smallest per-layer float−INT8 difference) and each
seeded trial: a ResNet-like simulated device (bench.simulate), its profiles as the prior, a
budget of 25/50/75% between the measured uniforms, and the loop as the search runs it, beside
the same fit solved without margin and without re-measuring (the open loop). A trial counts as
within budget when the pick's *true* latency meets the budget; "silent" counts picks the run
called ok that were not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from hilq.bench import latmodel, loop, simulate


def trial(seed: int, noise: float, layers: int, closed: bool, noise_of: str = "smallest"):
    sim = simulate.resnet_like(layers, seed=seed)
    deltas = [abs(sim.float_ms[x] - sim.int8_ms[x]) for x in sim.layers]
    sim.noise_ms = noise * (min(deltas) if noise_of == "smallest" else statistics.median(deltas))
    pats = latmodel.profile_patterns(sim.layers)
    profiles = [(c, sim.profile(c)) for c in pats.values()]
    wall = sim.measure(pats, rounds=3)
    prior = latmodel.prior_from_profiles(
        sim.layers, sim.edges, profiles,
        {i: statistics.median(wall[n]) for i, n in enumerate(pats)})
    sens = simulate.sensitivities(sim, seed)
    budget = ("25%", "50%", "75%")[seed % 3]
    seeded = {n: (pats[n], wall[n]) for n in pats}
    kw = {} if closed else {"z": 0.0, "max_iters": 1}
    r = loop.close_loop(sim.layers, sim.edges, sens, prior, lambda c: sim.measure(c, 3), budget,
                        measured=seeded, **kw)
    true = sim.latency(r.config) if r.config else None
    return r, true


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--layers", type=int, default=21)
    ap.add_argument("--noise", default="1,3")
    ap.add_argument("--noise-of", choices=("smallest", "median"), default="smallest")
    args = ap.parse_args(argv)
    print(f"{args.trials} trials, {args.layers} layers, noise × {args.noise_of} Δ")
    print(f"{'noise':>5} {'loop':>6} {'within':>7} {'silent':>6} {'missed':>6} {'iters':>5} "
          f"{'|err| med':>9} {'max':>6} {'s':>5}")
    for k in (float(v) for v in args.noise.split(",")):
        for closed in (True, False):
            t0 = time.perf_counter()
            inside = silent = missed = 0
            errs, iters = [], []
            for seed in range(args.trials):
                r, true = trial(seed, k, args.layers, closed, args.noise_of)
                ok = true is not None and true <= r.budget_ms
                inside += ok
                silent += r.status == "ok" and not ok
                missed += r.status != "ok"
                iters.append(len(r.iterations))
                if true and r.predicted_ms:
                    errs.append(abs(r.predicted_ms - true) / true)
            n = args.trials
            print(f"{k:5g} {'closed' if closed else 'open':>6} {inside / n:7.1%} {silent:6d} "
                  f"{missed:6d} {statistics.mean(iters):5.2f} {statistics.median(errs):9.2%} "
                  f"{max(errs):6.1%} {time.perf_counter() - t0:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
