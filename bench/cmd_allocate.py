"""`hilq allocate`: choose a precision per layer from a cost table under budgets.

    hilq allocate --table costs.csv --budget latency_ms=4.2 [--budget size_bits=...]
                  [--sweep latency_ms --points N] [--method ilp|pareto]
                  [--tie a,b] [--pin layer=precision] [--json OUT]

Exit codes: 0 solved, 1 infeasible (the message says by how much), 2 bad input.
"""

from __future__ import annotations

import math

from hilq.quant.allocate import Allocation, CostTable, allocate
from hilq.quant.options import AllocateOptions

from .cli import console as cli_console
from .cli import defaults
from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    d = defaults(AllocateOptions)
    parser.add_argument("--table", required=True, metavar="CSV",
                        help="cost table: layer, precision, sensitivity and cost columns "
                             "(latency_ms, energy_mj, size_bits, bops, ...)")
    parser.add_argument("--budget", action="append", default=[], metavar="COLUMN=VALUE",
                        help="bound the sum of a cost column over layers (repeatable)")
    parser.add_argument("--sweep", metavar="COLUMN",
                        help="sweep a budget on COLUMN from its smallest achievable value to "
                             "the unconstrained optimum; writes a frontier")
    parser.add_argument("--points", type=int, default=d["points"],
                        help="points in a sweep (default %(default)s)")
    parser.add_argument("--method", choices=("ilp", "pareto"), default=d["method"],
                        help="ilp: HiGHS, any budgets (default); pareto: ZeroQ's DP, one budget")
    parser.add_argument("--bins", type=int, default=None,
                        help="size bins for --method pareto (default: exact when sizes are integers)")
    parser.add_argument("--tie", action="append", default=[], metavar="A,B[,...]",
                        help="layers forced to share one precision (repeatable)")
    parser.add_argument("--pin", action="append", default=[], metavar="LAYER=PRECISION",
                        help="fix a layer's precision (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")


def _pairs(items: list[str], flag: str, number: bool) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE")
        if key in out:
            raise UserError(f"{flag} {key} given twice")
        if number:
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{flag} {item!r}: {value!r} is not a number") from None
            if not math.isfinite(value):
                raise UserError(f"{flag} {item!r}: value must be finite")
        out[key] = value
    return out


def _load(path: str) -> CostTable:
    import pandas as pd

    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read cost table {path}: {str(e).splitlines()[0]}") from None
    try:
        return CostTable.from_frame(df)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def options(args) -> AllocateOptions:
    """The command line -> `AllocateOptions` (which checks itself: one line, exit 2)."""
    ties = [[x.strip() for x in t.split(",") if x.strip()] for t in args.tie]
    for item, t in zip(args.tie, ties):
        if len(t) < 2:
            raise UserError(f"--tie {item!r}: needs at least two layers, comma separated")
    return AllocateOptions(budgets=_pairs(args.budget, "--budget", number=True),
                           method=args.method, sweep=args.sweep, points=args.points,
                           bins=args.bins, ties=ties, pins=_pairs(args.pin, "--pin", number=False))


def run(args) -> int:
    o = options(args)
    table = _load(args.table)
    try:
        result = allocate(table, o)
    except ValueError as e:  # unknown column or layer, bad tie or pin, bad sweep
        raise UserError(str(e)) from None

    if isinstance(result, list):
        _print_frontier(o.sweep, result)
        payload = {"method": o.method, "sweep": o.sweep, "budgets": o.budgets,
                   "frontier": [a.to_dict() for a in result]}
        ok = any(a.ok for a in result)
    else:
        _print_allocation(result)
        payload = {"method": o.method, **result.to_dict()}
        ok = result.ok
    write_json(args.json, payload)
    return 0 if ok else 1


def _print_allocation(a: Allocation) -> None:
    from rich.table import Table

    if not a.ok:
        print(a.message)
        return
    console = cli_console()
    layers = Table(title="allocation")
    layers.add_column("layer")
    layers.add_column("precision")
    for layer, prec in a.config.items():
        layers.add_row(layer, prec)
    totals = Table(title=f"totals (sensitivity {a.objective:.6g})")
    for name in ("column", "total", "budget"):
        totals.add_column(name, justify="left" if name == "column" else "right")
    for col, total in a.totals.items():
        b = a.budgets.get(col)
        totals.add_row(col, f"{total:.6g}", "" if b is None else f"{b:.6g}")
    console.print(layers)
    console.print(totals)


def _print_frontier(column: str, points: list[Allocation]) -> None:
    from rich.table import Table

    if len(points) == 1 and not points[0].ok:
        print(points[0].message)
        return
    cols = next((list(a.totals) for a in points if a.ok), [])
    t = Table(title=f"frontier: budget on {column} swept")
    for name in ["budget", "sensitivity", *cols]:
        t.add_column(name, justify="right")
    for a in points:
        t.add_row(f"{a.budgets[column]:.6g}", f"{a.objective:.6g}" if a.ok else a.status,
                  *[f"{a.totals[c]:.6g}" if a.ok else "" for c in cols])
    cli_console().print(t)
