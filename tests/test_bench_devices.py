"""Credibility benchmarks for the measurement harness (`tox -e bench`; excluded by default).

1. Busy-wait workloads of known length (1 ms, 10 ms) through the same timing loop the agent
   uses: hilq's p50 must be within 2% of the true value; the per-sample harness overhead
   (an empty call through the loop) is reported.
2. ResNet-18 INT8 (w8a8, ONNX Q/DQ) on ONNX Runtime, 5 runs, each a fresh agent process on
   the local device: the run-to-run coefficient of variation of p50 is reported.
Numbers land in pytest-benchmark's `extra_info` (and on stdout with -s).
"""

import statistics

import pytest
from hilq.devices import timing
from hilq.devices.agent import LoadProbe
from hilq.devices.local import LocalDevice

from hilq import stats
from hilq.measurement import Protocol

pytestmark = pytest.mark.bench


@pytest.mark.parametrize("true_ms", [1.0, 10.0])
def test_busy_wait_p50_within_2_percent(benchmark, true_ms):
    proto = {"warmup_iters": 5, "warmup_s": 0.1, "min_iters": 100, "min_duration_s": 1.0}

    def measure():
        return timing.measure(timing.busy_wait(true_ms), proto)

    probe = LoadProbe()
    timed = benchmark.pedantic(measure, rounds=1, iterations=1)
    others = probe.others()
    s = stats.Stats(timed.samples_ms)
    overhead = timing.harness_overhead_ms(5000)
    err = (s.p50 - true_ms) / true_ms
    benchmark.extra_info.update(true_ms=true_ms, p50_ms=s.p50, rel_error=err, n=s.n,
                                harness_overhead_ms=overhead, outliers_high=s.outliers_high,
                                others_cpu_share=others)
    print(f"\nbusy-wait {true_ms} ms: p50 {s.p50:.4f} ms (error {err:+.3%}), n={s.n}, "
          f"harness overhead {overhead * 1e3:.2f} us/sample, others' CPU share {others}")
    if abs(err) >= 0.02 and others is not None and others >= Protocol().busy_load:
        # what the agent does with such a run: flag it busy, never keep it silently
        pytest.xfail(f"machine busy (other processes used {others:.0%} of the CPU): a busy-wait "
                     "is preempted, so wall time exceeds the true value; rerun on a quiet machine")
    assert abs(err) < 0.02
    assert overhead < 0.02 * true_ms


def test_resnet18_int8_run_to_run_cv(benchmark, tmp_path_factory):
    export = pytest.importorskip("hilq.quant.export", reason="hilq.quant.export builds the INT8 artifact")
    art = export.build_artifact("resnet18", "w8a8", tmp_path_factory.mktemp("r18"), target="cpu")
    dev = LocalDevice(workdir=str(tmp_path_factory.mktemp("work")))
    proto = Protocol(warmup_iters=10, warmup_s=1.0, min_iters=50, min_duration_s=3.0)

    def five_runs():
        return [dev.run(art, proto, "ort") for _ in range(5)]

    runs = benchmark.pedantic(five_runs, rounds=1, iterations=1)
    assert all(m.ok for m in runs), [m.reason for m in runs]
    p50s = [m.latency_ms["p50"] for m in runs]
    cv = statistics.stdev(p50s) / statistics.mean(p50s)
    busy = [m.load.get("busy") for m in runs]
    benchmark.extra_info.update(p50_ms=p50s, cv_p50=cv, busy=busy,
                                cpu=runs[0].facts["cpu"]["model"],
                                flags=[f for f, on in runs[0].facts["cpu"]["flags"].items() if on])
    print(f"\nresnet18 w8a8 ORT p50 over 5 runs: {[round(p, 2) for p in p50s]} ms, "
          f"CV {cv:.2%}, busy flags {busy}")
