"""Benchmark: the data-free pipeline on resnet18 — ZeroQ distillation, per-layer sensitivity,
ILP allocation at the size of uniform W4 — timed end to end.

ZeroQ's defaults (32 samples, 500 iterations) take hours on a shared 2-core CPU, so the batch
and iterations come from the environment (defaults sized for this machine):

    HILQ_BENCH_SAMPLES (4)  HILQ_BENCH_ITERS (20)  HILQ_BENCH_METHOD (kl | hessian)
    HILQ_BENCH_HESSIAN_ITERS (2)  HILQ_BENCH_THREADS (1: faster than 2 on a busy 2-core box)

    pytest tests/test_zeroq_bench.py -m bench --benchmark-enable
"""

import os
import time

import pytest
import torch
from hilq.quant import zeroq
from hilq.quant.allocate import CostTable, solve_ilp
from hilq.quant.models import load_model
from hilq.quant.sensitivity import config_from_allocation, sensitivity_table
from hilq.quant.transform import fold_bn, layer_infos, size_bits

pytestmark = pytest.mark.bench


def _env(name: str, default):
    return type(default)(os.environ.get(name, default))


def test_data_free_pipeline_resnet18(benchmark):
    if benchmark.disabled:      # minutes of CPU: only when benchmarks are asked for
        pytest.skip("benchmarks disabled (run with -m bench --benchmark-enable)")
    samples, iters = _env("HILQ_BENCH_SAMPLES", 4), _env("HILQ_BENCH_ITERS", 20)
    method, threads = _env("HILQ_BENCH_METHOD", "kl"), _env("HILQ_BENCH_THREADS", 1)
    hessian_iters = _env("HILQ_BENCH_HESSIAN_ITERS", 2)
    entry = load_model("resnet18")
    model = entry.build().eval()
    infos = layer_infos(fold_bn(model), entry.input_shape)
    budget = size_bits(infos, config_from_allocation(model, {n: "w4a8" for n in infos}))
    phases: dict[str, float] = {}

    def pipeline():
        t0 = time.perf_counter()
        x = zeroq.distill(model, samples, entry.input_shape, iters=iters)
        t1 = time.perf_counter()
        kw = {"max_iters": hessian_iters} if method == "hessian" else {}
        df = sensitivity_table(model, x, (2, 4, 8), method=method, act_bits=8, **kw)
        t2 = time.perf_counter()
        alloc = solve_ilp(CostTable.from_frame(df), {"size_bits": budget})
        phases.update(distill_s=t1 - t0, sensitivity_s=t2 - t1,
                      allocate_s=time.perf_counter() - t2)
        return alloc

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alloc = benchmark.pedantic(pipeline, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(old)
    benchmark.extra_info.update(samples=samples, iters=iters, method=method, threads=threads,
                                hessian_iters=hessian_iters, **phases)
    print({"samples": samples, "iters": iters, "method": method, "threads": threads, **phases})
    assert alloc.ok and alloc.totals["size_bits"] <= budget
    assert set(alloc.config) == set(infos)
