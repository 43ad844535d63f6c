"""MLPerf scenarios through MLPerf's own LoadGen (PyPI `mlcommons-loadgen`, module
`mlperf_loadgen`): SingleStream, MultiStream, Server and Offline, each judged VALID or
INVALID by LoadGen's own rules (minimum duration and queries, the latency bound at the
target QPS, early stopping).

Part of the agent bundle: standard library + LoadGen, imported only when a scenario is
asked for (a device without it fails the run as `unsupported`). LoadGen calls `issue` from
its own threads; one worker thread runs the engine, one inference per `batch` samples,
answering as each completes, so a Server query that arrives while the engine is busy
waits, as it would on a one-stream device. This is a performance run: every sample feeds
the same inputs as hilq's own timing (LoadGen's sample indices select nothing), so the two
protocols time the same work.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time

SCENARIOS = {"single-stream": "SingleStream", "multi-stream": "MultiStream",
             "server": "Server", "offline": "Offline"}
# the queries each scenario needs for LoadGen's early-stopping estimate (its own messages:
# "Processed at least 64 queries", "at least 662"), used when the protocol sets none
MIN_QUERIES = {"single-stream": 64, "multi-stream": 662, "server": 500, "offline": 1}
# the scenario's metric: (name, unit, the detail log's key)
# Each scenario's metric as MLPerf states it: SingleStream's p90 latency, MultiStream's p99
# per query, Server's p99 at the target arrival rate, Offline's samples/s.
METRICS = {"single-stream": ("p90_latency_ms", "ms", "result_90.00_percentile_latency_ns"),
           "multi-stream": ("p99_latency_ms", "ms", "result_99.00_percentile_latency_ns"),
           "server": ("p99_latency_ms", "ms", "result_99.00_percentile_latency_ns"),
           "offline": ("samples_per_s", "samples/s", "result_samples_per_second")}
# the caps of every run (`bounds`): LoadGen issues for at most MAX_RUN_S (or twice the minimum
# duration, within half the protocol's max_duration_s, the scenario's share of the agent's
# timeout); a Server run ends once BACKLOG_S of work is queued; a target past REFUSE_FACTOR×
# what the SUT can do is refused before the run; the null-engine run's query count
MAX_RUN_S, BACKLOG_S, REFUSE_FACTOR, NULL_QUERIES = 30.0, 5.0, 2.0, 256
PERCENTILES = {"p50": "50.00", "p90": "90.00", "p95": "95.00", "p97": "97.00", "p99": "99.00",
               "p99.9": "99.90"}


def bounds(name: str, protocol: dict, estimate_ms: float, overhead_ms: float = 0.0) -> dict:
    """The run's caps, so that no target keeps the agent past its timeout (the scenario's
    share of it is the protocol's max_duration_s): LoadGen stops issuing at `max_s` or
    `max_query_count`, and a Server run at `max_async` queued queries (`BACKLOG_S` of
    work), so overload ends INVALID in seconds instead of queuing minutes of work."""
    min_s = float(protocol.get("min_duration_s", 2.0))
    max_s = min(0.5 * float(protocol.get("max_duration_s", 120.0)), max(MAX_RUN_S, 2 * min_s))
    min_q = int(protocol.get("min_queries") or MIN_QUERIES[name])
    cost = max(estimate_ms + overhead_ms, 1e-3)      # one sample through the SUT, ms
    per_query = estimate_ms * int(protocol.get("samples_per_query") or 8) + overhead_ms
    qps = float(protocol.get("target_qps") or 0) or 0.5 * 1000.0 / max(estimate_ms, 1e-3)
    queries = {"single-stream": 2 * min_s * 1000.0 / max(estimate_ms, 1e-3),   # as LoadGen
               "multi-stream": 2 * min_s * 1000.0 / max(per_query, 1e-3),      # generates
               "server": 2 * min_s * qps, "offline": 1}[name]   # twice: Poisson arrivals
    return {"min_s": min_s, "max_s": max_s, "min_queries": min_q, "cost_ms": cost,
            "query_ms": per_query if name == "multi-stream" else cost, "qps": qps,
            "max_query_count": max(min_q, math.ceil(queries)) + 1,
            "max_async": max(16, math.ceil(BACKLOG_S * 1000.0 / cost))}


def settings_for(lg, protocol: dict, estimate_ms: float, overhead_ms: float = 0.0):
    """LoadGen's TestSettings from hilq's protocol, and what was chosen where it set nothing.
    `estimate_ms`: the warm-up's median latency, for the expected rates LoadGen asks for;
    `overhead_ms`: the SUT's own per-query cost, for the Server backlog cap."""
    name = protocol["scenario"]
    b = bounds(name, protocol, estimate_ms, overhead_ms)
    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, SCENARIOS[name])
    s.mode = lg.TestMode.PerformanceOnly
    chosen = {}
    s.min_duration_ms = int(1000 * b["min_s"])
    s.max_duration_ms = int(1000 * b["max_s"])
    s.min_query_count = b["min_queries"]
    s.max_query_count = b["max_query_count"]
    rate = 1000.0 / max(estimate_ms, 1e-3)           # one stream's samples per second
    per_query = int(protocol.get("samples_per_query") or 8)
    bound_ms = float(protocol.get("target_latency_ms") or 0)
    if name == "single-stream":
        s.single_stream_expected_latency_ns = int(estimate_ms * 1e6)
    elif name == "multi-stream":
        s.multi_stream_samples_per_query = per_query
        s.multi_stream_expected_latency_ns = int(estimate_ms * per_query * 1e6)
        chosen["samples_per_query"] = per_query
    elif name == "server":
        if not protocol.get("target_qps"):   # half of one stream's rate: a load it should carry
            chosen["target_qps_from"] = round(b["qps"], 2)
        s.server_target_qps = round(b["qps"], 2)
        s.server_max_async_queries = chosen["server_max_async_queries"] = b["max_async"]
        if bound_ms:
            s.server_target_latency_ns = int(bound_ms * 1e6)
    else:   # offline: one query sized expected_qps × min_duration; too small is INVALID
        qps = float(protocol.get("target_qps") or 0) or round(1.5 * rate, 2)  # above the
        s.offline_expected_qps = chosen["expected_qps"] = qps     # real rate: lasts long enough
    chosen.update(min_query_count=s.min_query_count, max_query_count=s.max_query_count,
                  max_duration_ms=s.max_duration_ms)
    return s, chosen


def refusal(protocol: dict, estimate_ms: float, overhead_ms: float = 0.0) -> str | None:
    """Why the asked target cannot be met, judged from the warm-up before the run (the SUT
    has one worker: one stream's rate is all it serves), or None. Only a clear miss
    (`REFUSE_FACTOR`) is refused; nearer ones are LoadGen's to judge, within the caps."""
    name = protocol["scenario"]
    b = bounds(name, protocol, estimate_ms, overhead_ms)
    cost, rate = b["cost_ms"], 1000.0 / b["cost_ms"]
    serves = (f"one stream serves ({rate:.0f} qps at {cost:.3g} ms per sample: "
              f"{estimate_ms:.3g} ms inference + {overhead_ms:.3g} ms SUT overhead)")
    bound_ms = float(protocol.get("target_latency_ms") or 0)
    if b["min_s"] > b["max_s"]:
        return (f"minimum duration {b['min_s']:g} s is past the run's cap {b['max_s']:g} s "
                "(half the protocol's max_duration_s)")
    if name == "server" and b["qps"] > REFUSE_FACTOR * rate:
        return f"target {b['qps']:g} qps is {b['qps'] / rate:.3g}× what {serves}"
    if name != "offline" and bound_ms and b["query_ms"] > REFUSE_FACTOR * bound_ms:
        return (f"latency bound {bound_ms:g} ms is {b['query_ms'] / bound_ms:.3g}× below what "
                f"one query takes ({b['query_ms']:.3g} ms)")
    if name == "offline":   # one query of 1.1 × min duration × expected qps samples
        n = 1.1 * b["min_s"] * (float(protocol.get("target_qps") or 0)
                            or 1.5 * 1000.0 / max(estimate_ms, 1e-3))
        need = f"its one query of {n:.0f} samples takes ~{n * estimate_ms / 1000:.3g} s"
        need_s = n * estimate_ms / 1000
    else:
        need_s = b["min_queries"] * (1 / min(b["qps"], rate) if name == "server"
                                     else b["query_ms"] / 1000.0)
        need = f"the {b['min_queries']} queries it needs take ~{need_s:.3g} s"
    return f"{need}, past the run's cap {b['max_s']:g} s" if need_s > b["max_s"] else None


def run(infer, batch: int, protocol: dict, outdir: str, estimate_ms: float,
        over: dict) -> dict:
    """Run the protocol's scenario with `infer()` (one inference of `batch` samples); the
    result dict (see `summarize`), LoadGen's summary log text included. `over`: the SUT's
    own per-query cost (`sut_overhead`, measured before, outside the power meter's window);
    a target it clearly cannot meet is INVALID in seconds (`refused`) instead of minutes of
    LoadGen; every run is capped (`bounds`)."""
    import mlperf_loadgen as lg

    t0 = time.perf_counter()
    settings, chosen = settings_for(lg, protocol, estimate_ms, over["p50_ms"])
    why = refusal(protocol, estimate_ms, over["p50_ms"])
    if why:
        out = refused(protocol["scenario"], f"{why}: refused before the run")
    else:
        samples = _drive(lg, infer, batch, settings, outdir)
        out = summarize(protocol["scenario"], outdir)
        out["samples"] = samples
    out.update(settings_chosen=chosen, sut_overhead=over, sut_overhead_ms=over["p50_ms"],
               duration_s=round(time.perf_counter() - t0, 3))
    return out


def sut_overhead(outdir: str) -> dict:
    """What this SUT adds to every query besides the inference, as LoadGen sees it: LoadGen's
    SingleStream latency of the same SUT over a null engine (Python callback, hand-off to the
    worker, the completion call, LoadGen's own bookkeeping). hilq's timing has none of it,
    so it is what a LoadGen latency should exceed hilq's by."""
    import mlperf_loadgen as lg

    s = lg.TestSettings()
    s.scenario, s.mode = lg.TestScenario.SingleStream, lg.TestMode.PerformanceOnly
    s.min_duration_ms, s.single_stream_expected_latency_ns = 0, 50_000
    s.min_query_count = s.max_query_count = NULL_QUERIES
    _drive(lg, lambda: None, 1, s, outdir)
    lat = summarize("single-stream", outdir)["latency_ms"]
    return {"p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "queries": NULL_QUERIES,
            "method": "LoadGen SingleStream latency of the same SUT, null engine"}


def _drive(lg, infer, batch: int, settings, outdir: str) -> int:
    """One LoadGen run over the one-worker SUT; -> samples answered (energy divides by it)."""
    os.makedirs(outdir, exist_ok=True)
    work: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    done = [0]

    def worker():
        while (samples := work.get()) is not None:
            for i in range(0, len(samples), batch):
                chunk = samples[i:i + batch]
                try:
                    infer()
                except BaseException as e:  # noqa: BLE001 — answered, then reported
                    errors.append(e)
                done[0] += len(chunk)
                lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in chunk])

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    sut = lg.ConstructSUT(work.put, lambda: None)
    count = max(1024, settings.min_query_count)
    qsl = lg.ConstructQSL(count, min(count, 1024), lambda idx: None, lambda idx: None)
    log = lg.LogSettings()
    log.log_output.outdir = outdir
    log.log_output.copy_summary_to_stdout = False
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, log)
    finally:
        work.put(None)
        th.join()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    if errors:
        raise errors[0]
    return done[0]


def refused(name: str, reason: str) -> dict:
    """`summarize`'s fields for a run refused before LoadGen started: INVALID, no queries."""
    metric, unit, _ = METRICS[name]
    return {"scenario": name, "name": name, "valid": False, "result": "INVALID",
            "reasons": [reason], "reason": reason, "refused": True, "metric": metric,
            "unit": unit, "value": None, "latency_ms": {}, "query_count": 0, "qps": None,
            "early_stopping": None, "early_stopping_ms": None, "effective": {},
            "loadgen_version": None, "summary": "", "samples": 0}


def _detail(path: str) -> dict:
    """The detail log's `:::MLLOG {json}` records -> key: value (last one wins)."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith(":::MLLOG"):
                try:
                    rec = json.loads(line[len(":::MLLOG"):])
                except ValueError:
                    continue
                out[rec.get("key")] = rec.get("value")
    return out


def summarize(name: str, outdir: str) -> dict:
    """LoadGen's logs -> {scenario, valid, result, reasons, metric, value, unit,
    latency_ms: {p50..p99.9, mean, min, max}, query_count, qps, early_stopping,
    early_stopping_ms, effective (LoadGen's settings), summary (the summary log)}."""
    d = _detail(os.path.join(outdir, "mlperf_log_detail.txt"))
    with open(os.path.join(outdir, "mlperf_log_summary.txt")) as f:
        summary = f.read()
    valid = d.get("result_validity") == "VALID"
    reasons = []
    if d.get("result_min_duration_met") is False:
        reasons.append("minimum duration not met")
    if d.get("result_min_queries_met") is False:
        reasons.append("minimum query count not met")
    if d.get("result_perf_constraints_met") is False:
        reasons.append(f"latency bound missed at the target QPS ({d.get('result_overlatency_query_count')} "
                       f"of {d.get('result_query_count')} queries over "
                       f"{(d.get('effective_target_latency_ns') or 0) / 1e6:g} ms)")
    if d.get("early_stopping_met") is False:
        reasons.append("early stopping: " + " ".join(str(d.get("early_stopping_result", "")).split()))
    if d.get("error_runtime"):     # LoadGen ended early: a cap hit (bounds), or out of queries
        reasons.append("LoadGen: " + " ".join(str(d["error_runtime"]).split()))
    if d.get("result_invalid_reason"):
        reasons.append(str(d["result_invalid_reason"]))
    recs = summary.split("Recommendations:", 1)
    if len(recs) == 2:
        for line in recs[1].splitlines()[1:]:
            if not line.startswith(" * "):
                break
            reasons.append("LoadGen recommends: " + line[3:].strip())
    metric, unit, key = METRICS[name]
    value = d.get(key)
    if value is not None and unit == "ms":
        value = value / 1e6
    lat = {p: d[f"result_{k}_percentile_latency_ns"] / 1e6 for p, k in PERCENTILES.items()
           if d.get(f"result_{k}_percentile_latency_ns") is not None}
    lat.update({k: d[f"result_{k}_latency_ns"] / 1e6 for k in ("mean", "min", "max")
                if d.get(f"result_{k}_latency_ns") is not None})
    es = next((d[k] for k in ("early_stopping_latency_ss", "early_stopping_latency_ms",
                              "early_stopping_latency_mpq") if d.get(k)), None)
    return {"scenario": name, "name": name, "valid": valid, "result": d.get("result_validity"),
            "reasons": [] if valid else reasons,
            "reason": None if valid else "; ".join(reasons) or d.get("result_validity"),
            "metric": metric, "unit": unit, "value": value,
            "latency_ms": lat, "query_count": d.get("result_query_count"),
            "qps": d.get("result_qps_without_loadgen_overhead")
            or d.get("result_completed_samples_per_sec") or d.get("result_samples_per_second"),
            "early_stopping": " ".join(str(d.get("early_stopping_result", "")).split()) or None,
            "early_stopping_ms": es / 1e6 if es else None,
            "effective": {k[len("effective_"):]: v for k, v in d.items()
                          if k.startswith("effective_")},
            "loadgen_version": d.get("loadgen_version"), "summary": summary}
