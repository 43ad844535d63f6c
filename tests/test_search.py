"""The search's latency model without a device: the measuring order with repeated baselines,
drift-corrected deltas, the float-float boundary terms and relative budgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import search
from quant.allocate import CostTable, exhaustive, solve_ilp
from quant.spec import SpecError

B = "uniform-w8a8"


def test_baseline_is_measured_first_every_k_and_last():
    names = [f"c{i}" for i in range(8)]
    order = search._with_baselines(names, B, every=3)
    assert order == [B, "c0", "c1", "c2", f"{B}@2", "c3", "c4", "c5", f"{B}@3", "c6", "c7",
                     f"{B}@4"]
    assert [search._base_name(n) for n in order].count(B) == 4
    assert search._with_baselines(["a", "b", "c"], B, every=3) == [B, "a", "b", "c", f"{B}@2"]


def test_interpolated_baseline_cancels_drift_and_survives_a_failed_repeat():
    """A machine that slows down 1% per configuration: against the first baseline alone the
    deltas would be off by up to ~10%; against the interpolated baseline they are exact."""
    names = [f"c{i}" for i in range(10)]
    order = search._with_baselines(names, B, every=4)
    true_delta = {n: 0.1 * i for i, n in enumerate(names)}
    p50 = {n: 10.0 * (1 + 0.01 * pos) + true_delta.get(n, 0.0) for pos, n in enumerate(order)}
    base = search._interpolated_baseline(order, p50, B)
    assert set(base) == set(names)
    for n in names:
        assert p50[n] - base[n] == pytest.approx(true_delta[n], abs=1e-9)
    p50[f"{B}@2"] = None                       # a repeat that failed: its neighbours carry on
    base = search._interpolated_baseline(order, p50, B)
    assert all(abs(p50[n] - base[n] - true_delta[n]) < 0.01 * 10 * 12 for n in names)
    assert search._interpolated_baseline(order, dict.fromkeys(order), B) is None


def _table(deltas: dict[str, float], base: float = 10.0) -> CostTable:
    rows = []
    for lay, d in deltas.items():
        rows.append({"layer": lay, "precision": search.INT8, "latency_ms": base / len(deltas),
                     "sensitivity": 1.0})
        rows.append({"layer": lay, "precision": search.FLOAT,
                     "latency_ms": base / len(deltas) + d, "sensitivity": 0.0})
    return CostTable.from_rows(rows)


def test_boundary_terms_reproduce_the_measured_all_float_latency():
    deltas = {"a": 1.0, "b": 1.0, "c": 1.0}
    edges = [("a", "b"), ("b", "c")]
    table, beta = search._boundary_pairs(_table(deltas), edges, all_float_ms=12.0)
    assert beta == pytest.approx((13.0 - 12.0) / 2)
    all_float = dict.fromkeys(deltas, search.FLOAT)
    assert table.total(all_float, "latency_ms") == pytest.approx(12.0)
    # one float layer pays its full delta; two neighbours give one beta back
    assert table.total({"a": "fp32", "b": "w8a8", "c": "w8a8"}, "latency_ms") == \
        pytest.approx(11.0)
    assert table.total({"a": "fp32", "b": "fp32", "c": "w8a8"}, "latency_ms") == \
        pytest.approx(12.0 - beta)
    # the ILP with the pair terms agrees with enumeration
    budget = {"latency_ms": 11.6}
    assert solve_ilp(table, budget).objective == pytest.approx(exhaustive(table, budget).objective)
    assert search._boundary_pairs(_table(deltas), [], 12.0)[1] is None
    assert search._boundary_pairs(_table(deltas), edges, None)[1] is None


def test_relative_budgets_span_the_achievable_range():
    table = _table({"a": 1.0, "b": 2.0})
    got = search.resolve_budgets({"latency_ms": "50%"}, table)
    assert got["latency_ms"] == pytest.approx(10.0 + 0.5 * 3.0)
    assert search.resolve_budgets({"latency_ms": 11}, table) == {"latency_ms": 11.0}
    with pytest.raises(SpecError, match="no such column"):
        search.resolve_budgets({"energy_mj": "50%"}, table)


def test_float_edges_follow_tensors_through_relu_pool_and_residual_adds():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = self.c(torch.relu(self.b(y))) + y          # residual: a feeds c's add too
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    edges = set(search.float_edges(Net(), ["a", "b", "c", "fc"]))
    assert {("a", "b"), ("b", "c"), ("c", "fc")} <= edges
    assert ("a", "fc") in edges                          # through the residual add
    assert ("b", "fc") not in edges                      # b reaches fc only through c
