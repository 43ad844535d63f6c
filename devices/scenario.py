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
import os
import queue
import threading

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
PERCENTILES = {"p50": "50.00", "p90": "90.00", "p95": "95.00", "p97": "97.00", "p99": "99.00",
               "p99.9": "99.90"}


def settings_for(lg, protocol: dict, estimate_ms: float):
    """LoadGen's TestSettings from hilq's protocol, and what was chosen where it set nothing.
    `estimate_ms`: the warm-up's median latency, for the expected rates LoadGen asks for."""
    name = protocol["scenario"]
    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, SCENARIOS[name])
    s.mode = lg.TestMode.PerformanceOnly
    chosen = {}
    s.min_duration_ms = int(1000 * float(protocol.get("min_duration_s", 2.0)))
    s.max_duration_ms = int(1000 * float(protocol.get("max_duration_s", 120.0)))
    s.min_query_count = int(protocol.get("min_queries") or MIN_QUERIES[name])
    rate = 1000.0 / max(estimate_ms, 1e-3)           # one stream's samples per second
    per_query = int(protocol.get("samples_per_query") or 8)
    qps = float(protocol.get("target_qps") or 0)
    bound_ms = float(protocol.get("target_latency_ms") or 0)
    if name == "single-stream":
        s.single_stream_expected_latency_ns = int(estimate_ms * 1e6)
    elif name == "multi-stream":
        s.multi_stream_samples_per_query = per_query
        s.multi_stream_expected_latency_ns = int(estimate_ms * per_query * 1e6)
        chosen["samples_per_query"] = per_query
    elif name == "server":
        if not qps:   # half of one stream's rate: a load the device should carry
            qps = chosen["target_qps_from"] = round(0.5 * rate, 2)
        s.server_target_qps = qps
        if bound_ms:
            s.server_target_latency_ns = int(bound_ms * 1e6)
    else:   # offline: one query sized expected_qps × min_duration; too small is INVALID
        qps = qps or round(1.5 * rate, 2)     # above the real rate, so the query lasts long enough
        s.offline_expected_qps = qps
        chosen["expected_qps"] = qps
    chosen["min_query_count"] = s.min_query_count
    return s, chosen


def run(infer, batch: int, protocol: dict, outdir: str, estimate_ms: float) -> dict:
    """Run the protocol's scenario with `infer()` (one inference of `batch` samples); the
    result dict (see `summarize`), LoadGen's summary log text included."""
    import mlperf_loadgen as lg

    settings, chosen = settings_for(lg, protocol, estimate_ms)
    os.makedirs(outdir, exist_ok=True)
    work: queue.Queue = queue.Queue()
    errors: list[BaseException] = []
    done = [0]                          # samples answered: energy per inference divides by it

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
    out = summarize(protocol["scenario"], outdir)
    out["settings_chosen"] = chosen
    out["samples"] = done[0]
    return out


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
