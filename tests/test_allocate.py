"""Bit allocation: the ILP and the DP are held to brute force on small random tables."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from hilq.bench.cli import main
from hilq.quant.allocate import CostTable, exhaustive, frontier, pareto_dp, solve_ilp

PRECISIONS = ("w2a8", "w4a8", "w8a8")
COLUMNS = ("size_bits", "latency_ms", "energy_mj", "bops")


def random_rows(rng, n_layers, n_prec=None, same_set=False, int_sens=False):
    """Cost rows with layer-dependent precision sets (1..3 options) and integer sizes."""
    rows = []
    for i in range(n_layers):
        k = n_prec or (3 if same_set else int(rng.integers(1, 4)))
        precs = PRECISIONS[:k] if same_set else sorted(rng.choice(PRECISIONS, k, replace=False))
        params = int(rng.integers(10, 500))
        for p in precs:
            bits = int(p[1])
            sens = float(rng.integers(0, 5)) if int_sens else float(rng.exponential(1.0) / bits)
            rows.append({"layer": f"l{i}", "precision": p, "sensitivity": sens,
                         "size_bits": params * bits, "latency_ms": float(rng.uniform(0.1, 1) * bits),
                         "energy_mj": float(rng.uniform(0.5, 2) * bits),
                         "bops": params * bits * int(rng.integers(1, 4))})
    return rows


def random_budgets(rng, table, k):
    """k budgets, each somewhere between its smallest achievable total and a bit above the
    unconstrained optimum's (some instances end up infeasible, which is tested too)."""
    free = solve_ilp(table, {})
    budgets = {}
    for c in rng.choice(COLUMNS, k, replace=False):
        lo = sum(min(table.costs[c][(x, p)] for p in table.options[x]) for x in table.layers)
        budgets[str(c)] = float(rng.uniform(0.9 * lo, 1.05 * free.totals[c]))
    return budgets


def assert_meets(alloc, budgets):
    for c, b in budgets.items():
        assert alloc.totals[c] <= b + 1e-7 * max(1.0, abs(b)), (c, alloc.totals[c], b)


@pytest.mark.parametrize("seed", range(120))
def test_ilp_equals_exhaustive(seed):
    rng = np.random.default_rng(seed)
    table = CostTable.from_rows(random_rows(rng, int(rng.integers(1, 11)),
                                            int_sens=seed % 4 == 0))
    budgets = random_budgets(rng, table, int(rng.integers(1, 4)))
    ilp, brute = solve_ilp(table, budgets), exhaustive(table, budgets)
    assert ilp.status == brute.status
    if brute.ok:
        assert ilp.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-9)
        assert ilp.objective == pytest.approx(table.total(ilp.config, "sensitivity"))
        assert set(ilp.config) == set(table.layers)
        assert all(p in table.options[x] for x, p in ilp.config.items())
        assert_meets(ilp, budgets)
    else:
        assert ilp.message.startswith("infeasible:") and ilp.smallest


def test_ilp_at_ten_layers_three_precisions_three_budgets():
    for seed in range(5):
        rng = np.random.default_rng(1000 + seed)
        table = CostTable.from_rows(random_rows(rng, 10, n_prec=3))
        budgets = random_budgets(rng, table, 3)
        ilp, brute = solve_ilp(table, budgets), exhaustive(table, budgets)
        assert ilp.status == brute.status
        if brute.ok:
            assert ilp.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-9)


def brute_force(table, budgets, ties=(), pinned=None):
    """An independent oracle for ties and pins: plain loops over every configuration."""
    pinned = pinned or {}
    best = None
    for choice in itertools.product(*(table.options[x] for x in table.layers)):
        config = dict(zip(table.layers, choice))
        if any(config[x] != p for x, p in pinned.items()):
            continue
        if any(len({config[x] for x in tie}) > 1 for tie in ties):
            continue
        if any(table.total(config, c) > b + 1e-9 * max(1, abs(b)) for c, b in budgets.items()):
            continue
        s = table.total(config, "sensitivity")
        if best is None or s < best[0]:
            best = (s, config)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_ties_and_pins_honoured(seed):
    rng = np.random.default_rng(500 + seed)
    table = CostTable.from_rows(random_rows(rng, 6, same_set=True))
    budgets = random_budgets(rng, table, int(rng.integers(1, 3)))
    layers = list(table.layers)
    ties = [layers[0:2], [layers[2], layers[4], layers[3]]]
    pinned = {layers[5]: str(rng.choice(PRECISIONS))}
    if seed % 3 == 0:
        pinned[layers[1]] = str(rng.choice(PRECISIONS))
    best = brute_force(table, budgets, ties, pinned)
    got = solve_ilp(table, budgets, ties, pinned)
    assert got.ok == (best is not None)
    if best is not None:
        assert got.objective == pytest.approx(best[0], rel=1e-9, abs=1e-9)
        assert all(len({got.config[x] for x in tie}) == 1 for tie in ties)
        assert all(got.config[x] == p for x, p in pinned.items())
        assert_meets(got, budgets)
        assert exhaustive(table, budgets, ties, pinned).objective == pytest.approx(best[0])


def test_tie_forces_a_shared_precision():
    rows = [{"layer": x, "precision": p, "sensitivity": s, "size_bits": b}
            for x, p, s, b in [("a", "w8a8", 0.0, 8), ("a", "w4a8", 1.0, 4),
                               ("b", "w8a8", 5.0, 8), ("b", "w4a8", 0.0, 4)]]
    table = CostTable.from_rows(rows)
    assert solve_ilp(table, {"size_bits": 100}).config == {"a": "w8a8", "b": "w4a8"}
    tied = solve_ilp(table, {"size_bits": 100}, ties=[("a", "b")])
    assert tied.config == {"a": "w4a8", "b": "w4a8"} and tied.objective == 1.0
    pinned = solve_ilp(table, {"size_bits": 100}, ties=[("a", "b")], pinned={"b": "w8a8"})
    assert pinned.config == {"a": "w8a8", "b": "w8a8"} and pinned.objective == 5.0


@pytest.mark.parametrize("seed", range(30))
def test_dp_equals_ilp_on_size_only(seed):
    rng = np.random.default_rng(2000 + seed)
    table = CostTable.from_rows(random_rows(rng, int(rng.integers(1, 13))))
    budgets = random_budgets(rng, table, 1)
    col, b = "size_bits", next(iter(budgets.values()))
    dp, ilp = pareto_dp(table, b, col), solve_ilp(table, {col: b})
    assert dp.status == ilp.status
    if ilp.ok:
        assert dp.objective == pytest.approx(ilp.objective, rel=1e-9, abs=1e-9)
        assert dp.totals[col] <= b


def test_dp_with_few_bins_meets_the_budget():
    rng = np.random.default_rng(7)
    table = CostTable.from_rows(random_rows(rng, 12, same_set=True))
    b = 0.7 * solve_ilp(table, {}).totals["latency_ms"]
    coarse, exact = pareto_dp(table, b, "latency_ms", bins=50), solve_ilp(table, {"latency_ms": b})
    assert coarse.ok and coarse.totals["latency_ms"] <= b
    assert coarse.objective >= exact.objective - 1e-12


def test_infeasible_names_budget_and_smallest_value():
    rows = [{"layer": x, "precision": p, "sensitivity": s, "size_bits": b, "latency_ms": t}
            for x, p, s, b, t in [("a", "w8a8", 0, 800, 1.0), ("a", "w4a8", 1, 400, 3.0),
                                  ("b", "w8a8", 0, 800, 1.0), ("b", "w4a8", 1, 400, 3.0)]]
    table = CostTable.from_rows(rows)
    alone = solve_ilp(table, {"size_bits": 500})
    assert alone.status == "infeasible" and math.isnan(alone.objective)
    assert "size_bits <= 500" in alone.message and "smallest achievable is 800" in alone.message
    assert alone.smallest == {"size_bits": 800}
    assert pareto_dp(table, 500).smallest == {"size_bits": 800}
    # each budget can be met alone, not both: the smallest value given the other budget
    both = solve_ilp(table, {"size_bits": 1200, "latency_ms": 3.0})
    assert both.status == "infeasible"
    assert both.smallest == {"size_bits": 1600, "latency_ms": 4.0}
    assert "with the other budgets met" in both.message
    assert json.dumps(both.to_dict())  # NaN objective becomes null


def test_solutions_are_deterministic():
    rng = np.random.default_rng(3)
    table = CostTable.from_rows(random_rows(rng, 10, same_set=True, int_sens=True))
    budgets = random_budgets(rng, table, 2)
    first = solve_ilp(table, budgets)
    assert all(solve_ilp(table, budgets).config == first.config for _ in range(3))


def test_frontier_runs_from_smallest_to_unconstrained():
    rng = np.random.default_rng(11)
    table = CostTable.from_rows(random_rows(rng, 8, same_set=True))
    free = solve_ilp(table, {})
    points = frontier(table, "size_bits", 6)
    assert len(points) == 6 and all(a.ok for a in points)
    assert points[0].totals["size_bits"] == min(
        sum(table.costs["size_bits"][(x, p)] for x, p in zip(table.layers, c))
        for c in itertools.product(*(table.options[x] for x in table.layers)))
    assert points[-1].objective == pytest.approx(free.objective)
    objectives = [a.objective for a in points]
    assert objectives == sorted(objectives, reverse=True)
    dp = frontier(table, "size_bits", 6, method="pareto")
    assert [a.objective for a in dp] == pytest.approx(objectives)
    other = frontier(table, "latency_ms", 3, {"size_bits": points[2].budgets["size_bits"]})
    assert all(a.ok and a.totals["size_bits"] <= points[2].budgets["size_bits"] for a in other)
    assert frontier(table, "latency_ms", 3, {"size_bits": 1})[0].status == "infeasible"


@pytest.mark.parametrize("rows, match", [
    ([{"layer": "a", "precision": "w8a8", "size_bits": 1}], "missing column"),
    ([{"layer": "a", "precision": "w8a8", "sensitivity": 0.1},
      {"layer": "a", "precision": "w8a8", "sensitivity": 0.2}], "duplicate"),
    ([{"layer": "a", "precision": "w8a8", "sensitivity": float("nan")}], "NaN"),
    ([{"layer": "a", "precision": "w8a8", "sensitivity": 0.1, "size_bits": -8}], "negative"),
    ([{"layer": "a", "precision": "w8a8", "sensitivity": "x"}], "not a number"),
    ([], "empty"),
])
def test_table_validation(rows, match):
    with pytest.raises(ValueError, match=match):
        CostTable.from_rows(rows)


def test_bad_budgets_ties_and_pins():
    rows = [{"layer": x, "precision": p, "sensitivity": 1.0, "size_bits": 8}
            for x, p in [("a", "w8a8"), ("a", "w4a8"), ("b", "w8a8")]]
    table = CostTable.from_rows(rows)
    with pytest.raises(ValueError, match="unknown cost column 'latency_ms'"):
        solve_ilp(table, {"latency_ms": 1})
    with pytest.raises(ValueError, match="different precision sets"):
        solve_ilp(table, {}, ties=[("a", "b")])
    with pytest.raises(ValueError, match="no precision 'w2a8'"):
        solve_ilp(table, {}, pinned={"a": "w2a8"})
    with pytest.raises(ValueError, match="unknown layer 'c'"):
        solve_ilp(table, {}, pinned={"c": "w8a8"})


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def costs_csv(tmp_path):
    rng = np.random.default_rng(42)
    rows = random_rows(rng, 6, same_set=True)
    path = tmp_path / "costs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, CostTable.from_rows(rows)


def test_cli_allocates_and_writes_json(costs_csv, tmp_path, capsys):
    path, table = costs_csv
    budget = 0.8 * solve_ilp(table, {}).totals["latency_ms"]
    out = tmp_path / "out.json"
    code = main(["allocate", "--table", str(path), "--budget", f"latency_ms={budget}",
                 "--budget", "size_bits=1e9", "--tie", "l0,l1", "--pin", "l5=w8a8",
                 "--json", str(out)])
    assert code == 0
    got = json.loads(out.read_text())
    want = solve_ilp(table, {"latency_ms": budget, "size_bits": 1e9}, [("l0", "l1")],
                     {"l5": "w8a8"})
    assert got["status"] == "optimal" and got["config"] == want.config
    assert got["objective"] == pytest.approx(want.objective)
    assert got["totals"]["latency_ms"] <= budget and set(got["totals"]) == set(COLUMNS)
    assert got["config"]["l0"] == got["config"]["l1"] and got["config"]["l5"] == "w8a8"
    assert "l5" in capsys.readouterr().out


def test_cli_infeasible_exits_1_with_json(costs_csv, tmp_path, capsys):
    path, _ = costs_csv
    out = tmp_path / "out.json"
    assert main(["allocate", "--table", str(path), "--budget", "size_bits=1",
                 "--json", str(out)]) == 1
    got = json.loads(out.read_text())
    assert got["status"] == "infeasible" and got["objective"] is None
    assert "size_bits <= 1 cannot be met" in capsys.readouterr().out


def test_cli_sweep_writes_frontier(costs_csv, tmp_path):
    path, _ = costs_csv
    out = tmp_path / "sweep.json"
    for method in ("ilp", "pareto"):
        assert main(["allocate", "--table", str(path), "--sweep", "size_bits", "--points", "4",
                     "--method", method, "--json", str(out)]) == 0
        points = json.loads(out.read_text())["frontier"]
        assert len(points) == 4 and all(p["status"] == "optimal" for p in points)
        budgets = [p["budgets"]["size_bits"] for p in points]
        assert budgets == sorted(budgets)


@pytest.mark.parametrize("extra, match", [
    (["--budget", "latency_ms"], "expected NAME=VALUE"),
    (["--budget", "latency_ms=fast"], "not a number"),
    (["--budget", "watts=3"], "unknown cost column 'watts'"),
    (["--budget", "size_bits=1e9", "--pin", "l0=fp64"], "no precision 'fp64'"),
    (["--budget", "size_bits=1e9", "--budget", "bops=1e9", "--method", "pareto"], "exactly one"),
    ([], "at least one budget"),
])
def test_cli_bad_input_is_one_line_exit_2(costs_csv, capsys, extra, match):
    path, _ = costs_csv
    assert main(["allocate", "--table", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_cli_missing_column(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("layer,precision,size_bits\na,w8a8,8\n")
    assert main(["allocate", "--table", str(path), "--budget", "size_bits=8"]) == 2
    assert "missing column(s): sensitivity" in capsys.readouterr().err


def _brute_with_pairs(table, budgets):
    """Plain enumeration with `table.total` (pair terms included): the oracle for pairs."""
    import itertools

    best = None
    for combo in itertools.product(*[table.options[lay] for lay in table.layers]):
        cfg = dict(zip(table.layers, combo))
        if all(table.total(cfg, c) <= b + 1e-9 * max(1.0, abs(b)) for c, b in budgets.items()):
            s = table.total(cfg, "sensitivity")
            best = s if best is None or s < best else best
    return best


def test_ilp_with_pair_terms_equals_enumeration():
    """Interaction terms (both choices made -> a cost added, of either sign) are exact in the
    ILP: y = x_a AND x_b by three linear rows."""
    import random

    for seed in range(60):
        r = random.Random(seed)
        n_layers, n_prec = r.randint(2, 6), r.randint(2, 3)
        rows = [{"layer": f"l{i}", "precision": f"p{j}", "sensitivity": r.random() * (j > 0),
                 "latency_ms": r.uniform(-1, 3), "size_bits": r.randint(1, 9)}
                for i in range(n_layers) for j in range(n_prec)]
        pairs = [(f"l{a}", f"p{r.randrange(n_prec)}", f"l{b}", f"p{r.randrange(n_prec)}",
                  {"latency_ms": r.uniform(-2, 1)})
                 for a in range(n_layers) for b in range(a + 1, n_layers) if r.random() < 0.5]
        table = CostTable.from_rows(rows).with_pairs(pairs)
        budgets = {"latency_ms": r.uniform(0, 2 * n_layers)}
        if r.random() < 0.4:
            budgets["size_bits"] = r.uniform(n_layers, 5 * n_layers)
        got, want = solve_ilp(table, budgets), _brute_with_pairs(table, budgets)
        assert (want is None) == (got.status == "infeasible"), seed
        # the vectorised oracle counts the pair terms too
        assert exhaustive(table, budgets).status == got.status, seed
        if want is not None:
            assert got.objective == pytest.approx(want, rel=1e-7, abs=1e-9), seed
            assert exhaustive(table, budgets).objective == pytest.approx(want, rel=1e-7,
                                                                         abs=1e-9), seed
            for c, b in budgets.items():
                assert got.totals[c] <= b + 1e-6 * max(1.0, abs(b)), (seed, c)


def test_pair_terms_are_validated():
    table = CostTable.from_rows([{"layer": "a", "precision": "p", "sensitivity": 0.0,
                                  "latency_ms": 1.0}])
    with pytest.raises(ValueError, match="not in the table"):
        table.with_pairs([("a", "p", "b", "p", {"latency_ms": 1.0})])
    with pytest.raises(ValueError, match="unknown column"):
        table.with_pairs([("a", "p", "a", "p", {"energy_mj": 1.0})])
