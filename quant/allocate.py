"""Bit allocation: choose one precision per layer to minimise total sensitivity under budgets.

The input is a cost table, one row per (layer, precision) with a `sensitivity` and any number
of cost columns (`latency_ms`, `energy_mj`, `size_bits`, `bops`, ...). A budget bounds the sum
of one cost column over layers. Three solvers share one model of the problem:

- `solve_ilp`: HAWQ-V3's integer program, solved exactly by HiGHS; any set of budgets.
- `pareto_dp`: ZeroQ's dynamic programme over discretised size bins; one budget.
- `exhaustive`: brute force, the oracle the tests hold the other two to (small tables only).

Tied layers (forced to share a precision, e.g. a residual downsample and its main path) are
merged into one choice whose costs are the members' sums, so every solver handles ties the
same way; pinned layers keep only their pinned option. Pure: no files, no devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import reduce

import numpy as np

from .costs import CostTable

EXHAUSTIVE_LIMIT = 200_000  # configurations `exhaustive` will enumerate
DP_MAX_BINS = 200_000  # bins `pareto_dp` uses when exact bins would be more


@dataclass
class Allocation:
    """A solver's answer. `status` is "optimal" or "infeasible"; when infeasible, `config` is
    empty, `objective` is NaN and `message` names each budget that cannot be met with its
    smallest achievable value, also given in `smallest` (column -> value)."""

    status: str
    objective: float
    config: dict[str, str]
    totals: dict[str, float]
    message: str = ""
    budgets: dict[str, float] = field(default_factory=dict)
    smallest: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objective"] = None if math.isnan(self.objective) else self.objective  # JSON has no NaN
        return d


# --- the shared model: choices over groups of tied layers -------------------------------------


@dataclass(frozen=True)
class _Group:
    """One decision: the layers that share it, the precisions allowed, and per option the
    summed sensitivity (k,) and summed costs (k, n_columns) over the layers."""

    layers: tuple[str, ...]
    options: tuple[str, ...]
    sens: np.ndarray
    costs: np.ndarray


def _groups(table: CostTable, ties: Iterable[Sequence[str]] = (),
            pinned: Mapping[str, str] | None = None) -> list[_Group]:
    """Merge tied layers (transitively) and apply pins; ValueError on a contradiction."""
    pinned = dict(pinned or {})
    parent = {layer: layer for layer in table.layers}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for tie in ties:
        tie = list(tie)
        for layer in tie:
            if layer not in parent:
                raise ValueError(f"tie names unknown layer {layer!r}")
        for a, b in zip(tie, tie[1:]):
            if set(table.options[a]) != set(table.options[b]):
                raise ValueError(f"tied layers {a!r} and {b!r} have different precision sets")
            ra, rb = root(a), root(b)
            if ra != rb:
                # keep the earliest layer as the root so groups come out in table order
                first, second = sorted((ra, rb), key=table.layers.index)
                parent[second] = first
    for layer, prec in pinned.items():
        if layer not in parent:
            raise ValueError(f"pin names unknown layer {layer!r}")
        if prec not in table.options[layer]:
            raise ValueError(f"pin {layer}={prec}: layer {layer!r} has no precision {prec!r} "
                             f"(has {', '.join(table.options[layer])})")

    members: dict[str, list[str]] = {}
    for layer in table.layers:
        members.setdefault(root(layer), []).append(layer)
    groups = []
    for layers in members.values():
        pins = {pinned[x] for x in layers if x in pinned}
        if len(pins) > 1:
            raise ValueError(f"tied layers {', '.join(layers)} are pinned to different "
                             f"precisions: {', '.join(sorted(pins))}")
        opts = tuple(p for p in table.options[layers[0]] if not pins or p in pins)
        sens = np.array([math.fsum(table.sensitivity[(x, p)] for x in layers) for p in opts])
        costs = np.array([[math.fsum(table.costs[c][(x, p)] for x in layers)
                           for c in table.columns] for p in opts]).reshape(len(opts), -1)
        groups.append(_Group(tuple(layers), opts, sens, costs))
    return groups


def _check_budgets(table: CostTable, budgets: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for col, b in budgets.items():
        if col not in table.costs:
            have = ", ".join(table.columns) or "none"
            raise ValueError(f"budget on unknown cost column {col!r} (cost columns: {have})")
        b = float(b)
        if not math.isfinite(b):
            raise ValueError(f"budget {col}={b} is not a finite number")
        out[col] = b
    return out


def _allocation(table: CostTable, groups: list[_Group], choice: Sequence[int],
                budgets: Mapping[str, float]) -> Allocation:
    """The answer for one option index per group; objective and totals recomputed exactly."""
    config = {layer: g.options[k] for g, k in zip(groups, choice) for layer in g.layers}
    config = {layer: config[layer] for layer in table.layers}
    totals = {c: table.total(config, c) for c in table.columns}
    return Allocation("optimal", table.total(config, "sensitivity"), config, totals,
                      budgets=dict(budgets))


def _infeasible(budgets: Mapping[str, float], smallest: dict[str, float], alone: set[str],
                fallback: Mapping[str, float]) -> Allocation:
    """`smallest`: the budgets that cannot be met, each with its smallest achievable value
    (`alone`: those that cannot be met even without the other budgets)."""
    if smallest:
        parts = [f"{c} <= {budgets[c]:.10g} cannot be met: smallest achievable is {v:.10g}"
                 + ("" if c in alone else " with the other budgets met")
                 for c, v in smallest.items()]
    else:  # every budget can be met alone and with any one other, but not all together
        smallest = dict(fallback)
        parts = [f"budgets {', '.join(f'{c} <= {b:.10g}' for c, b in budgets.items())} cannot "
                 f"all be met together (smallest achievable each alone: "
                 f"{', '.join(f'{c} {v:.10g}' for c, v in fallback.items())})"]
    return Allocation("infeasible", math.nan, {}, {}, "infeasible: " + "; ".join(parts),
                      dict(budgets), smallest)


def _min_alone(groups: list[_Group], j: int) -> float:
    """Smallest total of cost column j with no budgets: separable, no solver needed."""
    return math.fsum(float(g.costs[:, j].min()) for g in groups)


# --- ILP ----------------------------------------------------------------------------------------


def _ilp(groups: list[_Group], objective: list[np.ndarray],
         rows: list[tuple[list[np.ndarray], float]],
         pairs: Sequence[tuple[int, int, Sequence[float]]] = ()) -> list[int] | None:
    """min sum objective.x  s.t. one option per group, each row sum coef.x <= bound; binary x.

    Returns the chosen option index per group, or None if infeasible. The objective and each
    row are scaled to O(1) so HiGHS's absolute tolerances act as relative ones; the gap is
    closed completely (HiGHS's default 1e-4 relative gap would not match exhaustive search).
    """
    import highspy

    sizes = [len(g.options) for g in groups]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    n = int(starts[-1])
    h = highspy.Highs()
    for name, value in (("output_flag", False), ("mip_rel_gap", 0.0), ("mip_abs_gap", 1e-9),
                        ("mip_feasibility_tolerance", 1e-9),
                        ("primal_feasibility_tolerance", 1e-9), ("random_seed", 0)):
        h.setOptionValue(name, value)
    h.addVars(n, np.zeros(n), np.ones(n))
    idx = np.arange(n, dtype=np.int32)
    h.changeColsIntegrality(n, idx, np.ones(n, dtype=np.uint8))  # 1 = integer
    obj = np.concatenate(objective).astype(float)
    scale = float(np.abs(obj).max()) or 1.0
    h.changeColsCost(n, idx, obj / scale)
    # one precision per group: sum_p x[g, p] = 1
    g_count = len(groups)
    h.addRows(g_count, np.ones(g_count), np.ones(g_count), n, starts[:-1], idx, np.ones(n))
    # pair k: y_k = x_a AND x_b, exactly: y <= x_a, y <= x_b, y >= x_a + x_b - 1, 0 <= y <= 1
    for k, (a, b, _) in enumerate(pairs):
        y = n + k
        h.addVars(1, np.zeros(1), np.ones(1))
        for lo, hi, cols, vals in ((-highspy.kHighsInf, 0.0, [y, a], [1.0, -1.0]),
                                   (-highspy.kHighsInf, 0.0, [y, b], [1.0, -1.0]),
                                   (-highspy.kHighsInf, 1.0, [a, b, y], [1.0, 1.0, -1.0])):
            if a == b and len(cols) == 3:        # one variable twice: HiGHS wants it once
                cols, vals = [a, y], [2.0, -1.0]
            h.addRows(1, np.array([lo]), np.array([hi]), len(cols), np.array([0], dtype=np.int32),
                      np.array(cols, dtype=np.int32), np.array(vals))
    for r, (coefs, bound) in enumerate(rows):
        c = np.concatenate([np.concatenate(coefs).astype(float),
                            np.array([p[2][r] for p in pairs], dtype=float)])
        s = max(abs(bound), float(np.abs(c).max())) or 1.0
        nz = np.flatnonzero(c).astype(np.int32)
        h.addRows(1, np.array([-highspy.kHighsInf]), np.array([bound / s]), len(nz),
                  np.array([0], dtype=np.int32), nz, c[nz] / s)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    if status != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"HiGHS stopped without an answer: {h.modelStatusToString(status)}")
    x = np.asarray(h.getSolution().col_value)[:n]
    return [int(np.argmax(x[a:b])) for a, b in zip(starts[:-1], starts[1:])]


def _pair_terms(table: CostTable, groups: list[_Group], budgets: Mapping[str, float]):
    """The table's pair terms as (x index a, x index b, coefficient per budget row); a pair
    whose choice a pin ruled out can never be active and is dropped."""
    where, start = {}, 0
    for g in groups:
        for layer in g.layers:
            for k, p in enumerate(g.options):
                where[(layer, p)] = start + k
        start += len(g.options)
    return [(where[(a, pa)], where[(b, pb)], [v.get(c, 0.0) for c in budgets])
            for a, pa, b, pb, v in table.pairs if (a, pa) in where and (b, pb) in where]


def _budget_rows(table: CostTable, groups: list[_Group], budgets: Mapping[str, float]):
    return [([g.costs[:, table.columns.index(c)] for g in groups], b) for c, b in budgets.items()]


def solve_ilp(table: CostTable, budgets: Mapping[str, float], ties: Iterable[Sequence[str]] = (),
              pinned: Mapping[str, str] | None = None) -> Allocation:
    """Minimise total sensitivity subject to `sum(column) <= bound` for each budget, one
    precision per layer, tied layers sharing one precision, pinned layers fixed.

    HAWQ-V3's formulation with binary x[layer, precision]. If infeasible, the message names
    each budget that cannot be met and the smallest value it could take while the other
    budgets hold (min of that column alone, subject to the rest).
    """
    budgets = _check_budgets(table, budgets)
    groups = _groups(table, ties, pinned)
    choice = _ilp(groups, [g.sens for g in groups], _budget_rows(table, groups, budgets),
                  _pair_terms(table, groups, budgets))
    if choice is not None:
        return _allocation(table, groups, choice, budgets)
    smallest, alone, fallback = {}, set(), {}
    for c, b in budgets.items():
        j = table.columns.index(c)
        fallback[c] = _min_alone(groups, j)
        if fallback[c] > b:
            smallest[c] = fallback[c]
            alone.add(c)
            continue
        others = {k: v for k, v in budgets.items() if k != c}
        best = _ilp(groups, [g.costs[:, j] for g in groups], _budget_rows(table, groups, others))
        if best is not None:
            v = _allocation(table, groups, best, {}).totals[c]
            if v > b:
                smallest[c] = v
    return _infeasible(budgets, smallest, alone, fallback)


# --- ZeroQ's Pareto DP --------------------------------------------------------------------------


def pareto_dp(table: CostTable, size_budget: float, column: str = "size_bits",
              bins: int | None = None, ties: Iterable[Sequence[str]] = (),
              pinned: Mapping[str, str] | None = None) -> Allocation:
    """ZeroQ's dynamic programme: min total sensitivity with sum(column) <= size_budget.

    Sizes are first shifted by each layer's smallest option (only the slack above the
    minimum is binned), then measured in units. Exact when every size is an integer: the
    unit is their greatest common divisor, so the DP gives the same optimum as `solve_ilp`
    (used when that needs at most `bins` bins, default DP_MAX_BINS). Otherwise the unit is
    slack/bins and sizes are rounded up, so the answer always meets the budget but may miss
    the optimum by up to one unit per layer. Ties in sensitivity go to the earlier row.
    """
    budgets = _check_budgets(table, {column: size_budget})
    groups = _groups(table, ties, pinned)
    j = table.columns.index(column)
    if any(float(g.costs[:, j].min()) < 0 for g in groups):
        raise ValueError(f"pareto_dp needs non-negative {column}")
    base = _min_alone(groups, j)
    if base > size_budget:
        return _infeasible(budgets, {column: base}, {column}, {column: base})
    slack = [g.costs[:, j] - g.costs[:, j].min() for g in groups]
    max_bins = bins or DP_MAX_BINS
    integral = all(np.array_equal(s, np.round(s)) for s in slack)
    unit = (reduce(math.gcd, (int(v) for s in slack for v in np.round(s)), 0) or 1) if integral else 0
    if unit and (size_budget - base) / unit <= max_bins:
        cap = int(math.floor((size_budget - base) / unit + 1e-9))
        weights = [np.round(s / unit).astype(np.int64) for s in slack]
    else:  # approximate: round sizes up so the budget is never exceeded
        unit = (size_budget - base) / max_bins if size_budget > base else 1.0
        cap = max_bins if size_budget > base else 0
        weights = [np.ceil(s / unit - 1e-9).astype(np.int64) for s in slack]

    dp = np.zeros(cap + 1)  # dp[s]: min sensitivity of the layers so far with slack <= s
    picks = np.zeros((len(groups), cap + 1), dtype=np.int16)
    for gi, (g, w) in enumerate(zip(groups, weights)):
        new = np.full(cap + 1, np.inf)
        for k in range(len(g.options)):
            if w[k] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w[k]:] = dp[:cap + 1 - w[k]] + g.sens[k]
            better = cand < new  # strict: the earlier option wins a tie
            new[better] = cand[better]
            picks[gi, better] = k
        dp = new
    choice, s = [], cap
    for gi in reversed(range(len(groups))):
        k = int(picks[gi, s])
        choice.append(k)
        s -= int(weights[gi][k])
    return _allocation(table, groups, choice[::-1], budgets)


# --- brute force and sweeps ---------------------------------------------------------------------


def exhaustive(table: CostTable, budgets: Mapping[str, float], ties: Iterable[Sequence[str]] = (),
               pinned: Mapping[str, str] | None = None) -> Allocation:
    """Enumerate every configuration (the test oracle); at most EXHAUSTIVE_LIMIT of them.
    A total within 1e-9 (relative) of its budget counts as meeting it, like the ILP."""
    budgets = _check_budgets(table, budgets)
    groups = _groups(table, ties, pinned)
    count = math.prod(len(g.options) for g in groups)
    if count > EXHAUSTIVE_LIMIT:
        raise ValueError(f"exhaustive search over {count} configurations (limit {EXHAUSTIVE_LIMIT})")
    pairs = _pair_masks(table, groups)
    sens = reduce(np.add.outer, [g.sens for g in groups]).ravel() + \
        sum((m * v.get("sensitivity", 0.0) for m, v in pairs), np.zeros(count))
    ok = np.ones(count, dtype=bool)
    for c, b in budgets.items():
        j = table.columns.index(c)
        total = reduce(np.add.outer, [g.costs[:, j] for g in groups]).ravel() + \
            sum((m * v.get(c, 0.0) for m, v in pairs), np.zeros(count))
        ok &= total <= b + 1e-9 * max(1.0, abs(b))
    if not ok.any():
        return Allocation("infeasible", math.nan, {}, {}, "infeasible: no configuration meets "
                          "the budgets", dict(budgets))
    flat = int(np.flatnonzero(ok)[np.argmin(sens[ok])])  # first in row order among ties
    choice = np.unravel_index(flat, [len(g.options) for g in groups])
    return _allocation(table, groups, [int(k) for k in choice], budgets)


def _pair_masks(table: CostTable, groups: list[_Group]) -> list[tuple[np.ndarray, dict]]:
    """For each pair term: which enumerated configurations (flat, C order, as `exhaustive`
    lays them out) make both of its choices, and its values."""
    if not table.pairs:
        return []
    where = {layer: (k, g) for k, g in enumerate(groups) for layer in g.layers}
    idx = np.indices([len(g.options) for g in groups]).reshape(len(groups), -1)
    out = []
    for a, pa, b, pb, values in table.pairs:
        (ka, ga), (kb, gb) = where[a], where[b]
        if pa in ga.options and pb in gb.options:
            out.append(((idx[ka] == ga.options.index(pa)) & (idx[kb] == gb.options.index(pb)),
                        values))
    return out


def frontier(table: CostTable, column: str, points: int,
             other_budgets: Mapping[str, float] | None = None, method: str = "ilp",
             ties: Iterable[Sequence[str]] = (), pinned: Mapping[str, str] | None = None,
             bins: int | None = None) -> list[Allocation]:
    """Sweep a budget on `column` over `points` evenly spaced values, from the smallest
    achievable total (given the other budgets) to the total of the unconstrained optimum,
    beyond which a looser budget changes nothing. Returns one Allocation per point, or a
    single infeasible one if the other budgets cannot be met. `method="pareto"` allows no
    other budgets (the DP handles one)."""
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    if method not in ("ilp", "pareto"):
        raise ValueError(f"unknown method {method!r} (use ilp or pareto)")
    others = _check_budgets(table, other_budgets or {})
    _check_budgets(table, {column: 0.0})
    if column in others:
        raise ValueError(f"{column} is both swept and budgeted")
    if method == "pareto" and others:
        raise ValueError("the Pareto DP takes a single budget; use method 'ilp' with other budgets")
    groups = _groups(table, ties, pinned)
    j = table.columns.index(column)
    top = solve_ilp(table, others, ties, pinned)
    if not top.ok:
        return [top]
    if method == "pareto":
        lo = _min_alone(groups, j)
    else:
        lo = _allocation(table, groups, _ilp(groups, [g.costs[:, j] for g in groups],
                                             _budget_rows(table, groups, others)), {}).totals[column]
    hi = max(lo, top.totals[column])
    values = [lo] if points == 1 else [float(v) for v in np.linspace(lo, hi, points)]
    values[-1] = hi if points > 1 else lo  # exact end points, free of linspace rounding
    if method == "pareto":
        return [pareto_dp(table, v, column, bins, ties, pinned) for v in values]
    return [solve_ilp(table, {**others, column: v}, ties, pinned) for v in values]



def allocate(table: CostTable, options) -> Allocation | list[Allocation]:
    """The allocate verb: one Allocation under `options.budgets`, or with `options.sweep` the
    frontier. A column or layer the table lacks is a ValueError naming it."""
    o = options
    ties, pins = [list(t) for t in o.ties], dict(o.pins)
    if o.sweep:
        return frontier(table, o.sweep, o.points, o.budgets, o.method, ties, pins, o.bins)
    if o.method == "pareto":
        (column, value), = o.budgets.items()
        return pareto_dp(table, value, column, o.bins, ties, pins)
    return solve_ilp(table, o.budgets, ties, pins)
