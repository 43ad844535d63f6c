"""A failed run inside a search is a typed failure of that search, never a traceback: a run
that returns nothing (or NaN) is no data, and a NaN that still reaches the cost table ends
the search `failed` with one line saying which cost."""

from __future__ import annotations

import math

from hilq.bench import latmodel, loop, simulate
from hilq.bench.latmodel import FLOAT, INT8


def _sim():
    sim = simulate.resnet_like(6, seed=2, noise_ms=0.01)
    pats = latmodel.profile_patterns(sim.layers)
    return sim, pats


def test_a_pattern_whose_runs_all_failed_is_left_out_of_the_fit():
    """The alternating pattern (half the layers float) failed on the device: no p50s, or a
    NaN one. The observations skip it; the fit and the loop carry on from the others."""
    sim, pats = _sim()
    measured = {n: (c, sim.measure({n: c})[n]) for n, c in pats.items()}
    measured["alternate-a"] = (pats["alternate-a"], [])
    measured["alternate-b"] = (pats["alternate-b"], [math.nan, math.nan])
    obs = latmodel.observations(measured)
    assert {o.name for o in obs} == {"uniform-" + INT8, "uniform-" + FLOAT}
    assert all(math.isfinite(o.latency_ms) and math.isfinite(o.se_ms) for o in obs)
    prior = latmodel.flat_prior(sim.layers, sim.edges, 5.0)
    r = loop.close_loop(sim.layers, sim.edges, simulate.sensitivities(sim), prior, sim.measure,
                        "50%", measured=measured)
    assert r.status in ("ok", "budget_missed"), r.message


def test_a_nan_kernel_time_in_a_profile_does_not_poison_the_prior():
    sim, pats = _sim()
    profs = [(c, sim.profile(c)) for c in pats.values()]
    profs[2][1]["layer_ms"][sim.layers[0]] = math.nan
    prior = latmodel.prior_from_profiles(sim.layers, sim.edges, profs)
    assert all(math.isfinite(v) for v in prior.mean) and all(math.isfinite(v) for v in prior.sd)


def test_a_pick_that_fails_on_the_device_is_noted_and_the_loop_goes_on():
    sim, _ = _sim()
    prior = latmodel.flat_prior(sim.layers, sim.edges, 5.0)
    failed = []

    def measure(configs):
        got = sim.measure(configs)
        if "pick" in got and not failed:          # the first pick's runs all crash
            failed.append(configs["pick"])
            got["pick"] = []
        return got

    r = loop.close_loop(sim.layers, sim.edges, simulate.sensitivities(sim), prior, measure, "50%")
    assert failed and r.iterations[0].note == "the pick failed on the device"
    assert r.status in ("ok", "budget_missed") and len(r.iterations) >= 2


def test_a_nan_that_reaches_the_cost_table_ends_the_search_failed_in_one_line():
    sim, _ = _sim()
    prior = latmodel.flat_prior(sim.layers, sim.edges, 5.0)
    sens = simulate.sensitivities(sim)
    sens[(sim.layers[3], INT8)] = math.nan        # a Δ computed from a run that failed
    r = loop.close_loop(sim.layers, sim.edges, sens, prior, sim.measure, "50%")
    assert r.status == "failed"
    assert "NaN" in r.message and sim.layers[3] in r.message
    assert len(r.message.splitlines()) == 1


def test_when_only_all_float_keeps_within_the_limit_it_is_the_answer():
    """Seen on Magika with `--max-drop close=0.0003`: every configuration with an INT8 layer
    lost more than the limit. All-float loses nothing by definition, so the search ends ok
    with it (as measured beside the others), not budget_missed at an all-float budget that
    its confidence margin can never meet. The device is the simulated one; the accuracy
    drops with every INT8 layer."""
    from types import SimpleNamespace

    from hilq.bench.search_accuracy import fastest_within

    sim, pats = _sim()
    measured = {n: (c, sim.measure({n: c}, rounds=2)[n]) for n, c in pats.items()}
    ctx = SimpleNamespace(layers=sim.layers, edges=sim.edges, model="sim", measure=sim.measure,
                          accuracy=lambda cfg: {"metric": {"close": 1.0 - 0.01 * sum(
                              v == INT8 for v in cfg.values())}})
    prior = latmodel.prior_from_profiles(sim.layers, sim.edges,
                                         [(c, sim.profile(c)) for c in pats.values()])
    result = SimpleNamespace(accuracy_checks=None)
    r = fastest_within(ctx, simulate.sensitivities(sim), prior, {"metric": {"close": 1.0}},
                       0.005, None, result, history=[], measured=measured, z=loop.Z_MARGIN,
                       tolerance=loop.TOLERANCE, max_iters=3, limits=None,
                       progress=lambda s: None, drop_metric="close")
    assert r.status == "ok" and set(r.config.values()) == {FLOAT}, r.message
    assert r.measured_ms == r.iterations[0].measured_ms > 0 and "all float" in r.message
    assert result.accuracy_checks and not any(c["within_limit"] for c in result.accuracy_checks)
