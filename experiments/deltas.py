"""The switch-one Δ model: the search's first latency model, kept as a check on the profile
based one (`bench.latmodel`) and for side-by-side comparisons (`experiments/compare_models.py`).

Starting from all-INT8, each layer in turn is switched to float and the whole network timed,
so the Q/DQ boundaries a switch brings are inside its Δ; the all-INT8 baseline is measured
again every `BASELINE_EVERY` configurations and each Δ taken against the baseline
interpolated between the measurements around it (drift cancels); each float-float edge gives
one β back, fitted so the table reproduces the measured all-float latency. On a noisy machine
the Δs (0.1-1.5 ms on ResNet-18) drown in the baseline's spread (±1.8 ms): an ILP fed these
alone picks the Δs that happened to read low (issue 12).
"""

from __future__ import annotations

import math

from hilq.bench.latmodel import FLOAT

BASELINE_EVERY = 6   # configurations between re-measurements of the baseline


def base_name(name: str) -> str:
    """`uniform-w8a8@3` (the third measurement of the baseline) -> `uniform-w8a8`."""
    return name.split("@", 1)[0]


def with_baselines(names: list[str], baseline: str, every: int = BASELINE_EVERY) -> list[str]:
    """The measuring order: the baseline first, again after every `every` configurations,
    and last (`baseline@2`, `baseline@3`, ... for the repeats)."""
    order, k = [baseline], 1
    for i, name in enumerate(names, 1):
        order.append(name)
        if i % every == 0 or i == len(names):
            k += 1
            order.append(f"{baseline}@{k}")
    return order


def interpolated_baseline(order: list[str], p50: dict, baseline: str) -> dict | None:
    """For each non-baseline name, the baseline's latency at its place in the order:
    linear between the nearest good baseline measurements before and after it."""
    marks = [(i, p50[n]) for i, n in enumerate(order) if base_name(n) == baseline and p50[n]]
    if not marks:
        return None
    out = {}
    for i, name in enumerate(order):
        if base_name(name) == baseline:
            continue
        before = [m for m in marks if m[0] < i][-1:] or marks[:1]
        after = [m for m in marks if m[0] > i][:1] or marks[-1:]
        (i0, v0), (i1, v1) = before[0], after[0]
        out[name] = v0 if i1 == i0 else v0 + (v1 - v0) * (i - i0) / (i1 - i0)
    return out


def boundary_pairs(table, edges, all_float_ms: float | None):
    """Pair terms so that the table reproduces the measured all-float latency: switching one
    layer to float alone pays for the Q/DQ boundaries around it, two float neighbours share
    theirs, so each float-float edge gives back beta = (Σ Δ − measured gap) / #edges."""
    if not edges or all_float_ms is None or math.isnan(all_float_ms) or \
            "latency_ms" not in table.columns:
        return table, None
    additive = table.total(dict.fromkeys(table.layers, FLOAT), "latency_ms")
    beta = (additive - all_float_ms) / len(edges)
    return table.with_pairs([(a, FLOAT, b, FLOAT, {"latency_ms": -beta}) for a, b in edges]), beta
