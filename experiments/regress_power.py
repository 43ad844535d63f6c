"""How often the nightly's regression rule catches a slowdown, at a given process noise.

    python -m experiments.regress_power [--trials 200] [--cv 0.005,0.02,0.06] [--detect 0.10]

Seeded synthetic nightlies with the default nightly's shape: 10 nights of history, 50
samples a round with 4% spread inside a process, and each round (a fresh process) off by a
lognormal factor of the given CV. Tonight is unchanged (false alarms) or 10% / 20% slower.
`bench.regress.compare` decides, exactly as `hilq nightly` calls it. "fixed" runs 2 rounds a
night; "adaptive" adds rounds to every night, as the nightly's `detect` setting does, until
the series' minimum detectable effect is at most `--detect` (or `--max-rounds`).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
from hilq.bench import regress


def night(rng, median: float, cv: float, rounds: int, samples: int = 50) -> list[np.ndarray]:
    return [median * rng.lognormal(0, cv) * rng.lognormal(0, 0.04, samples)
            for _ in range(rounds)]


def adaptive_night(rng, median, cv, history, detect, max_rounds, start=2):
    """Rounds until the series can see `detect` against `history` (lists of round p50s)."""
    rounds = night(rng, median, cv, start)
    while len(rounds) < max_rounds:
        tonight = [float(np.median(r)) for r in rounds]
        sigma = regress.round_noise([*history, tonight])
        mde = regress.minimum_detectable_effect(sigma, len(tonight),
                                                sum(len(h) for h in history))
        if mde is not None and mde <= detect:
            break
        rounds += night(rng, median, cv, 1)
    return rounds


def trial(seed, cv, slowdown, mode, detect, max_rounds, nights=10) -> tuple[bool, int, float]:
    rng = np.random.default_rng(seed)
    hist_rounds, hist_samples = [], []
    for _ in range(nights):
        rs = (adaptive_night(rng, 10.0, cv, hist_rounds, detect, max_rounds)
              if mode == "adaptive" and hist_rounds else night(rng, 10.0, cv, 2))
        hist_rounds.append([float(np.median(r)) for r in rs])
        hist_samples.append(np.concatenate(rs))
    median = 10.0 * (1 + slowdown)
    rs = (adaptive_night(rng, median, cv, hist_rounds, detect, max_rounds)
          if mode == "adaptive" else night(rng, median, cv, 2))
    tonight = [float(np.median(r)) for r in rs]
    v = regress.compare([statistics.median(h) for h in hist_rounds], statistics.median(tonight),
                        history_samples=np.concatenate(hist_samples), current_samples=np.concatenate(rs),
                        history_rounds=hist_rounds, current_rounds=tonight)
    return v.flagged, len(rs), v.mde if v.mde is not None else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cv", default="0.005,0.02,0.06")
    ap.add_argument("--detect", type=float, default=0.10)
    ap.add_argument("--max-rounds", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"{args.trials} trials; adaptive target: can see {args.detect:.0%}\n")
    print("| CV | rounds | false alarms | +10% detected | +20% detected | rounds/night | "
          "median MDE |")
    print("|---|---|---|---|---|---|---|")
    for cv in (float(c) for c in args.cv.split(",")):
        for mode in ("fixed", "adaptive"):
            rates, rounds, mdes = [], [], []
            for slow in (0.0, 0.10, 0.20):
                got = [trial(s, cv, slow, mode, args.detect, args.max_rounds)
                       for s in range(args.trials)]
                rates.append(sum(g[0] for g in got) / len(got))
                rounds += [g[1] for g in got]
                mdes += [g[2] for g in got]
            print(f"| {cv:.1%} | {mode} | {rates[0]:.1%} | {rates[1]:.1%} | {rates[2]:.1%} | "
                  f"{statistics.mean(rounds):.1f} | {100 * np.nanmedian(mdes):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
