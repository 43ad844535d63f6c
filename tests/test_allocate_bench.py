"""Solve time of the allocation ILP at model scale: 100 layers x 4 precisions x 3 budgets."""

from __future__ import annotations

import numpy as np
import pytest
from hilq.quant.allocate import CostTable, solve_ilp


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(100):
        params = int(rng.integers(1_000, 1_000_000))
        for bits in (2, 4, 6, 8):
            rows.append({"layer": f"layer{i}", "precision": f"w{bits}a8",
                         "sensitivity": float(rng.exponential(1.0) * 4.0 ** -bits * params),
                         "size_bits": params * bits,
                         "latency_ms": float(params * bits * rng.uniform(0.8, 1.2) * 1e-7),
                         "energy_mj": float(params * bits * rng.uniform(0.5, 1.5) * 1e-6)})
    table = CostTable.from_rows(rows)
    free = solve_ilp(table, {}).totals
    budgets = {"size_bits": 0.55 * free["size_bits"], "latency_ms": 0.6 * free["latency_ms"],
               "energy_mj": 0.6 * free["energy_mj"]}
    return table, budgets


@pytest.mark.bench
def test_ilp_100_layers_4_precisions_3_budgets(benchmark):
    table, budgets = _problem()
    result = benchmark(solve_ilp, table, budgets)
    assert result.status == "optimal"
    assert all(result.totals[c] <= b * (1 + 1e-7) for c, b in budgets.items())
