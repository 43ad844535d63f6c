"""The cost table the allocators read: one row per (layer, precision) with a `sensitivity`
and any number of cost columns (`latency_ms`, `energy_mj`, `size_bits`, `bops`, ...),
checked when built (a NaN or a negative count is a bug upstream, named in one line).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

KEY_COLUMNS = ("layer", "precision", "sensitivity")
COUNT_COLUMNS = ("size_bits", "bops")  # counts: negative values are always a bug upstream


@dataclass(frozen=True)
class CostTable:
    """A validated cost table. Build it with `from_rows` or `from_frame`.

    `options[layer]` keeps the precisions in table order. Ties in the objective are broken
    deterministically: `pareto_dp` and `exhaustive` prefer earlier rows; `solve_ilp` returns
    what HiGHS finds first, the same for the same table (fixed seed), but not necessarily
    the earliest rows (enforcing that would take one extra solve per layer).
    """

    layers: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    sensitivity: dict[tuple[str, str], float]
    costs: dict[str, dict[tuple[str, str], float]]  # column -> (layer, precision) -> value
    # Interaction terms: (layer_a, prec_a, layer_b, prec_b, {column: value}) adds `value` to
    # `column` when both choices are made (e.g. the Q/DQ boundary two float neighbours share).
    pairs: tuple[tuple[str, str, str, str, dict], ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.costs)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping]) -> CostTable:
        """Validate rows (dicts) into a table; any problem is one ValueError line."""
        rows = list(rows)
        if not rows:
            raise ValueError("cost table is empty")
        cols = list(rows[0])
        missing = [c for c in KEY_COLUMNS if c not in cols]
        if missing:
            raise ValueError(f"cost table is missing column(s): {', '.join(missing)}")
        cost_cols = [c for c in cols if c not in KEY_COLUMNS]
        layers: dict[str, None] = {}
        options: dict[str, list[str]] = {}
        sens: dict[tuple[str, str], float] = {}
        costs: dict[str, dict[tuple[str, str], float]] = {c: {} for c in cost_cols}
        for i, row in enumerate(rows, start=1):
            if set(row) != set(cols):
                raise ValueError(f"cost table row {i}: columns differ from the first row")
            layer, prec = str(row["layer"]).strip(), str(row["precision"]).strip()
            if not layer or not prec or _is_nan(row["layer"]) or _is_nan(row["precision"]):
                raise ValueError(f"cost table row {i}: empty layer or precision")
            key = (layer, prec)
            if key in sens:
                raise ValueError(f"cost table: duplicate row for layer {layer!r} precision {prec!r}")
            layers[layer] = None
            options.setdefault(layer, []).append(prec)
            sens[key] = _number(row["sensitivity"], "sensitivity", key)
            for c in cost_cols:
                v = _number(row[c], c, key)
                if v < 0 and c in COUNT_COLUMNS:
                    raise ValueError(f"cost table: negative {c} ({v:g}) for {layer!r} {prec!r}")
                costs[c][key] = v
        return cls(tuple(layers), {k: tuple(v) for k, v in options.items()}, sens, costs)

    @classmethod
    def from_frame(cls, df) -> CostTable:
        """From a pandas DataFrame with the table's columns."""
        return cls.from_rows(df.to_dict("records"))

    def with_pairs(self, pairs: Iterable[tuple[str, str, str, str, Mapping]]) -> CostTable:
        """This table plus interaction terms on cost columns (validated: one ValueError line)."""
        out = []
        for a, pa, b, pb, values in pairs:
            for layer, prec in ((a, pa), (b, pb)):
                if prec not in self.options.get(layer, ()):
                    raise ValueError(f"pair term names {layer!r} {prec!r}, not in the table")
            unknown = set(values) - set(self.columns)
            if unknown:
                raise ValueError(f"pair term on unknown column(s): {', '.join(sorted(unknown))}")
            out.append((a, pa, b, pb, {c: float(v) for c, v in values.items()}))
        return replace(self, pairs=tuple(out))

    def total(self, config: Mapping[str, str], column: str) -> float:
        """Sum of `column` ('sensitivity' or a cost column) over the layers of `config`,
        plus the pair terms whose two choices `config` makes."""
        values = self.sensitivity if column == "sensitivity" else self.costs[column]
        return math.fsum([values[(layer, config[layer])] for layer in self.layers] +
                         [v.get(column, 0.0) for a, pa, b, pb, v in self.pairs
                          if config.get(a) == pa and config.get(b) == pb])


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _number(v, column: str, key: tuple[str, str]) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"cost table: {column} for {key[0]!r} {key[1]!r} is not a number: {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"cost table: {column} for {key[0]!r} {key[1]!r} is {x} (NaN or infinite)")
    return x


