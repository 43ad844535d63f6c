"""MLPerf scenarios through the real LoadGen (`mlcommons-loadgen`), driven by the agent in its
own process on `digits-cnn`, with short settings: every scenario's fields, VALID where the
device can carry the load, INVALID (with LoadGen's reason, and a non-zero exit of
`hilq bench`) where it cannot; stored and reported beside hilq's own timing."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import pytest
from helpers import require_import
from hilq.bench import cli
from hilq.bench.cmd_bench import scenario_line
from hilq.bench.report import render
from hilq.bench.runner import bench_variants
from hilq.bench.store import open_store
from hilq.devices import scenario
from hilq.devices.local import LocalDevice
from hilq.quant.export import build_artifact

from hilq.measurement import Protocol

SHORT = Protocol(warmup_iters=20, warmup_s=0.0, min_iters=50, min_duration_s=0.5,
                 max_duration_s=20, idle_s=0.05, threads=1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits-cnn's FP32 artifact; every test here needs LoadGen (skip, or fail where
    HILQ_REQUIRE names `loadgen`)."""
    require_import("loadgen", "mlperf_loadgen",
                   "MLPerf LoadGen is not installed (pip install mlcommons-loadgen)")
    return build_artifact("digits-cnn", "fp32", tmp_path_factory.mktemp("digits"))


def _run(art, tmp_path, **kw):
    dev = LocalDevice(workdir=str(tmp_path / "w"))
    (m,) = bench_variants("digits-cnn", [art], dev, "ort", replace(SHORT, **kw), rounds=1)
    return m


@pytest.mark.load
@pytest.mark.parametrize("name", list(scenario.SCENARIOS))
def test_each_scenario_is_valid_where_the_device_carries_it(digits, tmp_path, name):
    # Server at 1000 queries/s: a load a 13 µs model carries with room for the Python SUT's
    # own per-query cost (the default, half of one stream's rate, left 19% of queries over
    # the 100 ms bound in one quiet run here: a target at the edge, not what this checks)
    m = _run(digits, tmp_path, scenario=name, **({"target_qps": 1000} if name == "server"
                                                  else {}))
    assert m.status == "ok", m.reason
    sc = m.scenario
    assert sc["scenario"] == sc["name"] == name and sc["result"] == "VALID" and sc["valid"], \
        sc["reasons"]
    assert sc["reason"] is None
    assert sc["reasons"] == [] and "MLPerf Results Summary" in sc["summary"]
    assert sc["metric"] == scenario.METRICS[name][0] and sc["value"] > 0
    assert sc["query_count"] >= scenario.MIN_QUERIES[name]
    assert sc["effective"]["scenario"] == scenario.SCENARIOS[name].replace("-", "")
    assert m.latency_ms["p50"] > 0          # hilq's own timing ran too, same process
    assert sc["sut_overhead_ms"] > 0 and sc["duration_s"] < 30
    assert sc["query_count"] <= sc["settings_chosen"]["max_query_count"]
    if name in ("single-stream", "multi-stream", "server"):
        lat = sc["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    if name == "single-stream":
        assert sc["value"] == pytest.approx(sc["latency_ms"]["p90"])
        assert sc["early_stopping_ms"] and sc["early_stopping_ms"] >= sc["latency_ms"]["p50"]
    if name == "server":
        assert "target_qps_from" not in sc["settings_chosen"]    # the rate given was used


def test_an_impossible_server_rate_is_refused_in_seconds_with_the_reason(digits, tmp_path):
    # 20× one stream's rate (hilq's own p50), past REFUSE_FACTOR even before the SUT's cost:
    # INVALID before LoadGen starts, no query run, the caps and the SUT's cost recorded
    one = 1000.0 / _run(digits, tmp_path).latency_ms["p50"]
    m = _run(digits, tmp_path, scenario="server", target_qps=round(20 * one))
    sc = m.scenario
    assert m.status == "ok" and sc["result"] == "INVALID" and not sc["valid"] and sc["refused"]
    (why,) = sc["reasons"]
    assert why == sc["reason"] and why.endswith(": refused before the run")
    assert f"target {round(20 * one):g} qps is" in why and "× what one stream serves" in why
    assert sc["query_count"] == 0 and sc["samples"] == 0 and sc["duration_s"] < 30
    chosen = sc["settings_chosen"]
    assert chosen["max_duration_ms"] <= 1000 * SHORT.max_duration_s / 2
    assert chosen["max_query_count"] >= chosen["min_query_count"] > 0
    assert chosen["server_max_async_queries"] > 0
    assert sc["sut_overhead_ms"] > 0 and sc["sut_overhead"]["queries"] == scenario.NULL_QUERIES
    assert f"+ {sc['sut_overhead_ms']:.3g} ms SUT overhead)" in why    # counted in the rate
    line = scenario_line(m)
    assert line.startswith("LoadGen server: INVALID") and why in line
    assert f"SUT overhead {sc['sut_overhead_ms']:.3f} ms per query" in line


def test_an_overloaded_server_run_ends_at_the_backlog_cap(tmp_path, monkeypatch):
    """A 0.5 ms engine (a sleep: it releases the GIL, as an engine does, and a busy machine
    only makes it slower) at 1.5× its rate, under the refusal factor: LoadGen runs, and
    ends once the backlog cap is queued, with its own reason, before the 6000 queries of
    the 2 s minimum duration are issued."""
    require_import("loadgen", "mlperf_loadgen", "MLPerf LoadGen is not installed")
    monkeypatch.setattr(scenario, "BACKLOG_S", 0.2)
    proto = {"scenario": "server", "target_qps": 3000, "min_duration_s": 2.0}
    sc = scenario.run(lambda: time.sleep(0.0005), 1, proto, str(tmp_path / "lg"),
                      estimate_ms=0.5, over=scenario.sut_overhead(str(tmp_path / "null")))
    cap = sc["settings_chosen"]["server_max_async_queries"]
    assert sc["result"] == "INVALID" and not sc.get("refused") and 16 <= cap <= 400
    assert any("Too many outstanding queries" in r for r in sc["reasons"]), sc["reasons"]
    assert "minimum duration not met" in sc["reasons"]
    assert sc["query_count"] < 3000 * 2.0 / 2 and sc["duration_s"] < 30


@pytest.mark.load
def test_a_server_rate_the_device_cannot_meet_is_invalid_within_the_caps(digits, tmp_path):
    """1.7× what one stream serves (the SUT's own cost counted) on a 13 µs engine: INVALID in
    seconds either way: by LoadGen's latency verdict within the caps, or, when the agent's own
    warm-up reads the engine 18% slower than this test did (the 2× refusal factor), refused
    before the run. At 1.25× the device met the rate once (p50 plus the null-SUT latency
    overstates one sample's cost), so the margin is wide. LoadGen's own INVALID under a
    controlled engine is `test_an_overloaded_server_run_ends_at_the_backlog_cap`."""
    over = scenario.sut_overhead(str(tmp_path / "null"))["p50_ms"]
    cost = _run(digits, tmp_path).latency_ms["p50"] + over
    m = _run(digits, tmp_path, scenario="server", target_qps=round(1.7 * 1000.0 / cost),
             target_latency_ms=5.0)
    sc = m.scenario
    assert m.status == "ok" and sc["result"] == "INVALID" and not sc["valid"]
    assert sc["duration_s"] < 30 and sc["name"] == "server"
    if sc.get("refused"):
        assert "what one stream serves" in sc["reason"], sc["reason"]
        return
    assert any("latency bound" in r for r in sc["reasons"]), sc["reasons"]
    assert any(r.startswith("LoadGen recommends") for r in sc["reasons"]), sc["reasons"]
    assert 0 < sc["query_count"] <= sc["settings_chosen"]["max_query_count"]


def test_bench_cli_stores_reports_and_exits_nonzero_on_invalid(digits, tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    common = ["bench", "--artifact", digits.path, "--rounds", "2", "--min-iters", "50",
              "--min-duration-s", "0.5", "--warmup-s", "0", "--threads", "1", "--db", str(db)]
    assert cli.main([*common, "--scenario", "single-stream", "--json",
                     str(tmp_path / "ok.json")]) == 0
    out = capsys.readouterr().out
    assert "LoadGen single-stream: VALID, p90_latency_ms" in out and "hilq p90" in out
    assert "SUT overhead" in out and "ms per query" in out
    (row,) = json.loads((tmp_path / "ok.json").read_text())["measurements"]
    assert row["scenario"]["valid"] and row["memory"]["timed_peak_mb"] > 0
    # the documented --json interface: memory {peak_rss_mb, peak_gpu_mb} and scenario
    # {name, metric, value, valid, reason}
    sc, mem = row["scenario"], row["memory"]
    assert (sc["name"], sc["metric"], sc["reason"]) == ("single-stream", "p90_latency_ms", None)
    assert sc["value"] > 0 and mem["peak_rss_mb"] >= mem["timed_peak_mb"]
    assert "peak_gpu_mb" in mem and mem["peak_gpu_mb"] is None        # a CPU engine
    assert cli.main([*common, "--scenario", "server", "--target-qps", "1000000",
                     "--target-latency-ms", "1"]) == 1
    out = capsys.readouterr().out
    assert "LoadGen server: INVALID" in out and "judged 1 scenario run(s) INVALID" in out
    store = open_store(db)
    runs = [r["id"] for r in store.rows("runs")]
    rows = store.measurements(runs[-1])
    assert len(rows) == 2                                     # two rounds of hilq's timing
    with_sc = [r for r in rows if r["scenario"]]
    assert len(with_sc) == 1 and with_sc[0]["scenario_valid"] is False   # LoadGen once
    assert with_sc[0]["extra"]["scenario"]["refused"]       # a million qps: refused, stored
    rep = render(store, runs[-1], tmp_path / "rep")
    text = rep.markdown.read_text()
    reasons = "; ".join(with_sc[0]["extra"]["scenario"]["reasons"])
    assert rep.sections["MLPerf scenarios (LoadGen)"] and reasons
    assert f"LoadGen server INVALID ({reasons})" in text        # the first screen, with why
    rep = render(store, runs[0], tmp_path / "rep0")
    assert "LoadGen vs hilq" in rep.markdown.read_text()
    assert cli.main([*common, "--scenario", "tarot"]) == 2
    assert "--scenario 'tarot'" in capsys.readouterr().err


def test_settings_follow_the_protocol(digits):
    import mlperf_loadgen as lg

    s, chosen = scenario.settings_for(lg, {"scenario": "multi-stream", "min_duration_s": 1.5,
                                           "samples_per_query": 4}, estimate_ms=2.0)
    assert s.min_duration_ms == 1500 and s.multi_stream_samples_per_query == 4
    assert s.min_query_count == scenario.MIN_QUERIES["multi-stream"]
    assert s.multi_stream_expected_latency_ns == 8_000_000 and chosen["samples_per_query"] == 4
    s, chosen = scenario.settings_for(lg, {"scenario": "offline"}, estimate_ms=4.0)
    assert s.offline_expected_qps == pytest.approx(375.0) and chosen["expected_qps"] == 375.0


def test_every_run_is_capped_and_recorded(digits):
    # LoadGen stops issuing at half the protocol's max_duration_s (the scenario's share of
    # the agent's timeout; MAX_RUN_S unless the minimum duration needs more), at a query
    # count sized for the minimum duration, and Server at BACKLOG_S of queued work
    import mlperf_loadgen as lg

    proto = {"scenario": "server", "target_qps": 100, "min_duration_s": 2.0,
             "max_duration_s": 120.0}
    s, chosen = scenario.settings_for(lg, proto, estimate_ms=1.0, overhead_ms=0.25)
    assert s.max_duration_ms == chosen["max_duration_ms"] == 1000 * scenario.MAX_RUN_S
    assert s.max_query_count == chosen["max_query_count"] == scenario.MIN_QUERIES["server"] + 1
    assert s.server_max_async_queries == chosen["server_max_async_queries"] == \
        scenario.BACKLOG_S * 1000 / 1.25
    s, _ = scenario.settings_for(lg, {**proto, "max_duration_s": 20.0}, estimate_ms=1.0)
    assert s.max_duration_ms == 10_000
    s, chosen = scenario.settings_for(lg, {**proto, "scenario": "single-stream",
                                           "min_duration_s": 40.0}, estimate_ms=1.0)
    assert s.max_duration_ms == 60_000 and chosen["max_query_count"] == 80_001
    # a Server run at a high rate: room for twice the minimum duration's Poisson arrivals (at
    # exactly the minimum's count, about half the runs ended "minimum duration not met")
    _, chosen = scenario.settings_for(lg, {**proto, "target_qps": 10_000}, estimate_ms=0.05)
    assert chosen["max_query_count"] == 2 * 2.0 * 10_000 + 1


def test_refusal_judges_the_target_against_the_warm_up(digits):
    # one stream of a 0.96 ms engine + 0.04 ms SUT overhead serves 1000 qps; refused only
    # past REFUSE_FACTOR (2×), or where the run cannot end within its cap
    def why(estimate_ms=0.96, overhead_ms=0.04, **proto):
        return scenario.refusal({"min_duration_s": 2.0, **proto}, estimate_ms, overhead_ms)

    assert why(scenario="server", target_qps=100000) == (
        "target 100000 qps is 100× what one stream serves (1000 qps at 1 ms per sample: "
        "0.96 ms inference + 0.04 ms SUT overhead)")
    assert why(scenario="server", target_qps=1900) is None        # LoadGen's to judge
    assert why(scenario="server") is None                         # the default rate
    assert "latency bound 0.4 ms is 2.5× below" in why(scenario="server", target_qps=100,
                                                       target_latency_ms=0.4)
    assert why(scenario="single-stream", target_latency_ms=0.6) is None
    assert "latency bound 1 ms is 7.72×" in why(scenario="multi-stream", target_latency_ms=1)
    assert "past the run's cap 30 s" in why(scenario="server", target_qps=10)   # 500 queries
    assert "its one query of" in why(scenario="offline", target_qps=100000)
    assert why(scenario="offline") is None
    assert "minimum duration 80 s is past the run's cap 60 s" in why(
        scenario="single-stream", min_duration_s=80.0)


def test_energy_over_the_loadgen_run_with_the_idle_baseline(digits, tmp_path):
    """A meter (any program printing watts) on: joules per inference over LoadGen's own run,
    gross and above idle, beside the timed run's figure."""
    meter = tmp_path / "meter.py"
    meter.write_text("import time\nwhile True:\n    print('7.0 W', flush=True)\n"
                     "    time.sleep(0.01)\n")
    m = _run(digits, tmp_path, scenario="offline", power=f"command:{sys.executable} -u {meter}",
             power_interval_s=0.01, idle_s=0.2)
    e = m.scenario["energy"]
    assert m.status == "ok" and e["meter"].startswith("command:") and e["reason"] is None
    assert e["idle_w"] == pytest.approx(7.0) and e["avg_w"] == pytest.approx(7.0)
    n = m.scenario["samples"]
    assert n >= m.scenario["query_count"] > 0
    assert e["j_per_inference"] == pytest.approx(7.0 * e["window_s"] / n, rel=0.05)
    assert abs(e["dynamic_j_per_inference"]) < 0.05 * e["j_per_inference"]  # constant draw
    assert m.energy_j_per_inference is not None                # hilq's own timed window too
