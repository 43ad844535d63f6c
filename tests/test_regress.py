"""Regression detection on seeded synthetic nightly histories: power and false-alarm rate of
the documented rule, baseline resets, and the store-backed pass."""

from __future__ import annotations

import numpy as np
import pytest
from hilq.bench import regress
from hilq.bench.store import open_store

from hilq.measurement import Measurement

NIGHTS = 10
SAMPLES = 200
TRIALS = 200


def night(rng, median=20.0, factor=1.0, n=SAMPLES) -> np.ndarray:
    """One night's latency samples: a night-to-night drift of ~2% (machine state, thermals),
    lognormal jitter of ~5% within the night and a few slow outliers (preemption)."""
    drift = rng.lognormal(0.0, 0.02)
    s = median * factor * drift * rng.lognormal(0.0, 0.05, n)
    slow = rng.random(n) < 0.02
    s[slow] *= rng.uniform(1.3, 2.0, slow.sum())
    return s


def trial(rng, factor: float) -> regress.Verdict:
    hist = [night(rng) for _ in range(NIGHTS)]
    tonight = night(rng, factor=factor)
    return regress.compare([float(np.median(h)) for h in hist], float(np.median(tonight)),
                           history_samples=np.concatenate(hist), current_samples=tonight)


def rates(seed: int, factor: float) -> float:
    rng = np.random.default_rng(seed)
    return sum(trial(rng, factor).flagged for _ in range(TRIALS)) / TRIALS


def test_power_10_percent_slowdown_flagged_95_percent():
    detected = rates(1, 1.10)
    print(f"detection of +10%: {detected:.1%} over {TRIALS} trials")
    assert detected >= 0.95


def test_unchanged_history_false_alarms_at_most_5_percent():
    false_alarms = rates(2, 1.0)
    print(f"false alarms, unchanged: {false_alarms:.1%} over {TRIALS} trials")
    assert false_alarms <= 0.05


def rounds_night(rng, factor=1.0, k=3, n=100, process=0.08, median=0.06) -> list[np.ndarray]:
    """One night as the nightly records it: k rounds, each a fresh process whose samples
    shift together (memory layout, clocks: `process` lognormal sigma), ~5% jitter within a
    round, ~2% night-to-night drift. A 0.06 ms model with 8% process noise is digits-cnn."""
    drift = rng.lognormal(0.0, 0.02)
    return [median * factor * drift * rng.lognormal(0.0, process)
            * rng.lognormal(0.0, 0.05, n) for _ in range(k)]


def round_rate(seed, factor, *, process, history=3, gate=True) -> float:
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(TRIALS):
        hist = [rounds_night(rng, process=process) for _ in range(history)]
        cur = rounds_night(rng, factor, process=process)
        per_round = [[float(np.median(r)) for r in night_] for night_ in hist]
        tonight = [float(np.median(r)) for r in cur]
        kw = dict(history_rounds=per_round, current_rounds=tonight) if gate else {}
        flagged += regress.compare(
            [float(np.median(v)) for v in per_round], float(np.median(tonight)),
            history_samples=np.concatenate([np.concatenate(h) for h in hist]),
            current_samples=np.concatenate(cur), **kw).flagged
    return flagged / TRIALS


def test_round_noise_gate_stops_false_alarms_on_a_noisy_tiny_model():
    """Samples within a round are not independent: pooled Mann-Whitney alone flags an
    unchanged noisy model on about one night in five; the round-level gate does not."""
    without = round_rate(5, 1.0, process=0.08, gate=False)
    with_gate = round_rate(5, 1.0, process=0.08)
    print(f"false alarms, 8% process noise: {without:.1%} without the gate, {with_gate:.1%} with")
    assert without >= 0.15 and with_gate <= 0.05


def test_round_noise_gate_keeps_power_where_the_change_is_visible():
    steady = round_rate(6, 1.10, process=0.002, history=10)   # a steady, ResNet-18-like model
    noisy = round_rate(7, 1.30, process=0.08, history=10)
    print(f"detection: +10% steady {steady:.1%}; +30% at 8% process noise {noisy:.1%}")
    assert steady >= 0.95 and noisy >= 0.90
    v = regress.compare([0.060, 0.061], 0.069, history_rounds=[[0.055, 0.065], [0.056, 0.066]],
                        current_rounds=[0.064, 0.074], history_samples=[0.06] * 50 + [0.061] * 50,
                        current_samples=[0.069] * 100)
    assert not v.flagged and "round-to-round noise" in v.note and "rounds" in v.method


def test_speedup_is_not_a_regression_but_throughput_drop_is():
    rng = np.random.default_rng(3)
    assert not trial(rng, 0.8).flagged
    v = regress.compare([100.0, 101.0, 99.0, 100.5], 80.0, metric="throughput",
                        higher_is_better=True)
    assert v.flagged and v.method == "zscore" and v.change == pytest.approx(-0.2, abs=0.01)


def test_small_significant_shift_below_threshold_not_flagged():
    rng = np.random.default_rng(4)
    base = 20 * rng.lognormal(0, 0.01, 5000)
    cur = 20 * 1.02 * rng.lognormal(0, 0.01, 5000)
    v = regress.compare([20.0] * 3 + [20.1], float(np.median(cur)), history_samples=base,
                        current_samples=cur)
    assert v.p_value < 1e-6 and not v.flagged and "threshold" in v.note


def test_no_history_and_z_needs_three_runs():
    v = regress.compare([], 10.0)
    assert not v.flagged and v.note == "no history"
    assert regress.lookback_z([1.0, 2.0], 5.0) is None
    assert regress.lookback_z([1.0, 1.0, 1.0], 5.0) is None       # no spread
    assert regress.lookback_z([1.0, 2.0, 3.0], 4.0) == pytest.approx(2.0)


# --------------------------------------------------------------- through the store


def measurement(samples: np.ndarray, variant="w8a8") -> Measurement:
    lat = {"p50": float(np.median(samples)), "mean": float(samples.mean()),
           "p90": float(np.percentile(samples, 90)), "p99": float(np.percentile(samples, 99))}
    return Measurement("resnet18", variant, "local", "onnxruntime", latency_ms=lat,
                       samples_ms=samples.round(4).tolist(), energy_j_per_inference=0.01,
                       facts={"cpu": "synthetic"})


def nightly(store, rng, factors: list[float]) -> list[str]:
    runs = []
    for i, f in enumerate(factors):
        run = store.begin_run({"night": i})
        for r in range(2):
            store.add_measurement(run, measurement(night(rng, factor=f, n=100)), round=r)
        store.finish_run(run)
        runs.append(run)
    return runs


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "hilq.sqlite")
    yield s
    s.close()


def test_detect_writes_verdicts_and_flags_slowdown(store):
    runs = nightly(store, np.random.default_rng(5), [1.0] * 6 + [1.15])
    rows = regress.detect(store, runs[-1])
    p50 = next(r for r in rows if r["metric"] == "p50")
    assert p50["flagged"] and p50["n_history"] == 6 and p50["change"] > 0.08
    energy = next(r for r in rows if r["metric"] == "energy_j")
    assert not energy["flagged"]
    stored = store.regressions(runs[-1], flagged_only=True)
    assert [(r["metric"], r["flagged"]) for r in stored] == [("p50", True)]
    # the first night has nothing to compare with
    first = regress.detect(store, runs[0])
    assert not any(r["flagged"] for r in first) and first[0]["note"] == "no history"
    # detection is re-runnable: verdicts are replaced, never duplicated
    regress.detect(store, runs[-1])
    assert len(store.regressions(runs[-1])) == 2


def test_intended_change_resets_baseline(store):
    key = ("resnet18", "w8a8", "local", "onnxruntime")
    # a deliberate +20% at night 4 (e.g. a more accurate kernel), then steady
    runs = nightly(store, np.random.default_rng(6), [1.0] * 4 + [1.2] * 4)
    assert next(r for r in regress.detect(store, runs[4]) if r["metric"] == "p50")["flagged"]
    store.mark_intended(runs[4], *key, reason="accurate GELU")
    after = next(r for r in regress.detect(store, runs[4]) if r["metric"] == "p50")
    assert not after["flagged"] and after["note"] == "no history"
    later = next(r for r in regress.detect(store, runs[7]) if r["metric"] == "p50")
    assert not later["flagged"] and later["n_history"] == 3


def test_cli_regressions_and_mark_intended(store, tmp_path, capsys):
    import json

    from hilq.bench.cli import main

    runs = nightly(store, np.random.default_rng(7), [1.0] * 5 + [1.2])
    db = store.url
    assert main(["results", "regressions", "--db", db, "--detect"]) == 0
    assert "REGRESSION resnet18 w8a8 local/onnxruntime p50" in capsys.readouterr().out
    out = tmp_path / "mark.json"
    assert main(["results", "mark-intended", "--db", db, "--model", "resnet18", "--variant",
                 "w8a8", "--device", "local", "--runtime", "onnxruntime", "--reason",
                 "new accurate kernel", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["run_id"] == runs[-1]
    assert not store.regressions(runs[-1], flagged_only=True)
    assert main(["results", "mark-intended", "--db", db, "--model", "resnet18", "--variant",
                 "nope", "--device", "local", "--runtime", "onnxruntime",
                 "--reason", "x"]) == 2
    assert "no measurement of resnet18 nope" in capsys.readouterr().err


def test_minimum_detectable_effect_falls_with_rounds_and_never_below_the_threshold():
    mdes = [regress.minimum_detectable_effect(0.06, k, 20) for k in (2, 4, 8, 16)]
    assert mdes == sorted(mdes, reverse=True) and mdes[-1] > regress.THRESHOLD
    assert regress.minimum_detectable_effect(0.002, 2, 20) == pytest.approx(
        np.expm1(np.log1p(0.05) + 1.645 * 0.002 * np.sqrt(0.55)))
    assert regress.minimum_detectable_effect(None, 2, 20) is None
    k = regress.rounds_for(0.06, 20, 0.10)
    assert regress.minimum_detectable_effect(0.06, k, 20) <= 0.10 < \
        regress.minimum_detectable_effect(0.06, k - 1, 20)
    assert regress.rounds_for(0.06, 20, 0.05) is None        # at the threshold: never


def test_a_slowdown_at_the_minimum_detectable_effect_is_flagged_about_95_percent():
    """The MDE is what it says: seeded nightlies with 6% process noise (2 rounds a night, 10
    nights), tonight slower by the MDE of that noise: flagged in ≥ 85% of 200 trials (95% by
    design with σ known; 89% measured, as each night's gate uses its own estimate of σ), and a
    slowdown halfway between the threshold and the MDE far less often. The MDE each verdict reports (from its estimated σ) centres on the true one."""
    from experiments import regress_power as rp

    mde = regress.minimum_detectable_effect(0.06, 2, 20)
    runs = [rp.trial(s, 0.06, mde, "fixed", 0.1, 16) for s in range(TRIALS)]
    low = sum(rp.trial(s, 0.06, 0.5 * (mde + regress.THRESHOLD), "fixed", 0.1, 16)[0]
              for s in range(TRIALS)) / TRIALS
    hit = sum(r[0] for r in runs) / TRIALS
    assert hit >= 0.85 and low < 0.8 * hit
    assert np.median([r[2] for r in runs]) == pytest.approx(mde, rel=0.3)
