"""The switch-one Δ model (the check beside the profile model): the measuring order with
repeated baselines, drift-corrected deltas and the float-float boundary terms."""

from __future__ import annotations

import pytest
from hilq.bench.latmodel import FLOAT, INT8
from hilq.quant.allocate import CostTable, exhaustive, solve_ilp

from experiments import deltas as dm

B = "uniform-w8a8"


def test_baseline_is_measured_first_every_k_and_last():
    names = [f"c{i}" for i in range(8)]
    order = dm.with_baselines(names, B, every=3)
    assert order == [B, "c0", "c1", "c2", f"{B}@2", "c3", "c4", "c5", f"{B}@3", "c6", "c7",
                     f"{B}@4"]
    assert [dm.base_name(n) for n in order].count(B) == 4
    assert dm.with_baselines(["a", "b", "c"], B, every=3) == [B, "a", "b", "c", f"{B}@2"]


def test_interpolated_baseline_cancels_drift_and_survives_a_failed_repeat():
    """A machine that slows down 1% per configuration: against the first baseline alone the
    deltas would be off by up to ~10%; against the interpolated baseline they are exact."""
    names = [f"c{i}" for i in range(10)]
    order = dm.with_baselines(names, B, every=4)
    true_delta = {n: 0.1 * i for i, n in enumerate(names)}
    p50 = {n: 10.0 * (1 + 0.01 * pos) + true_delta.get(n, 0.0) for pos, n in enumerate(order)}
    base = dm.interpolated_baseline(order, p50, B)
    assert set(base) == set(names)
    for n in names:
        assert p50[n] - base[n] == pytest.approx(true_delta[n], abs=1e-9)
    p50[f"{B}@2"] = None                       # a repeat that failed: its neighbours carry on
    base = dm.interpolated_baseline(order, p50, B)
    assert all(abs(p50[n] - base[n] - true_delta[n]) < 0.01 * 10 * 12 for n in names)
    assert dm.interpolated_baseline(order, dict.fromkeys(order), B) is None


def _table(deltas: dict[str, float], base: float = 10.0) -> CostTable:
    rows = []
    for lay, d in deltas.items():
        rows.append({"layer": lay, "precision": INT8, "latency_ms": base / len(deltas),
                     "sensitivity": 1.0})
        rows.append({"layer": lay, "precision": FLOAT,
                     "latency_ms": base / len(deltas) + d, "sensitivity": 0.0})
    return CostTable.from_rows(rows)


def test_boundary_terms_reproduce_the_measured_all_float_latency():
    deltas = {"a": 1.0, "b": 1.0, "c": 1.0}
    edges = [("a", "b"), ("b", "c")]
    table, beta = dm.boundary_pairs(_table(deltas), edges, all_float_ms=12.0)
    assert beta == pytest.approx((13.0 - 12.0) / 2)
    all_float = dict.fromkeys(deltas, FLOAT)
    assert table.total(all_float, "latency_ms") == pytest.approx(12.0)
    # one float layer pays its full delta; two neighbours give one beta back
    assert table.total({"a": "fp32", "b": "w8a8", "c": "w8a8"}, "latency_ms") == \
        pytest.approx(11.0)
    assert table.total({"a": "fp32", "b": "fp32", "c": "w8a8"}, "latency_ms") == \
        pytest.approx(12.0 - beta)
    # the ILP with the pair terms agrees with enumeration
    budget = {"latency_ms": 11.6}
    assert solve_ilp(table, budget).objective == pytest.approx(exhaustive(table, budget).objective)
    assert dm.boundary_pairs(_table(deltas), [], 12.0)[1] is None
    assert dm.boundary_pairs(_table(deltas), edges, None)[1] is None
