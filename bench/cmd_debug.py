"""`hilq debug`: which layer loses the accuracy — per-layer error, float vs quantized.

    hilq debug --model M --variant V | --artifact FILE [--device local --runtime ort]
               [--inventory devices.toml] [--data D] [--samples 64] [--no-engine]
               [--out DIR] [--json OUT] [--plot PNG]

For every quantized layer: output SQNR (dB) and cosine similarity against the float model,
on the engine (the artifact's debug copy, each layer's output exposed as a graph output, run
by the device's agent over an evaluation set like every measurement) and on the fake-quant
model (`_simulated`); and each layer's own error (the layer fed the float model's input),
against the error it inherits. Rows are ordered from the worst layer to the best; the line
under the table names where the error is introduced (the worst own error).
A gap over 1 dB between engine and simulation is explained where it can be measured: the
fake-quant model re-run with every output Q the exported graph has (`sqnr_db_deployed_sim`).
Exits 1 when the engine run fails, 2 on bad input.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .cli import (
    add_model_arguments,
    add_runtime_option_argument,
    defaults,
    model_ref,
    runtime_options,
)
from .errors import UserError
from .output import write_json


def add_arguments(p) -> None:
    from hilq.devices.runtimes import NAMES
    from hilq.quant.options import ExportOptions
    from hilq.quant.spec import CALIB_DATA, GRANULARITIES

    from .debug import DebugOptions

    d, e = defaults(DebugOptions), defaults(ExportOptions)
    add_model_arguments(p, required=False)
    p.add_argument("--variant", help="w8a8, w4a8, ... or config:PATH.json (with --model)")
    p.add_argument("--artifact", metavar="FILE", help="an exported artifact (FILE + manifest)")
    p.add_argument("--device", default=d["device"],
                   help=f"device from the inventory (default {d['device']})")
    p.add_argument("--runtime", default=d["runtime"], choices=NAMES,
                   help=f"engine that runs the debug copy (ort or openvino; default "
                        f"{d['runtime']})")
    p.add_argument("--inventory", help="devices.toml (not needed for --device local)")
    add_runtime_option_argument(p)
    p.add_argument("--no-engine", action="store_true", help="simulation only, no device run")
    p.add_argument("--samples", type=int, default=d["samples"],
                   help=f"test inputs compared (default {d['samples']})")
    p.add_argument("--calib", default=e["calib"], help="activation calibration method")
    p.add_argument("--calib-data", default=e["calib_data"], choices=CALIB_DATA)
    p.add_argument("--granularity", default=e["granularity"], choices=GRANULARITIES)
    p.add_argument("--group-size", type=int, default=e["group_size"])
    p.add_argument("--repair", default="", help="comma-separated PTQ repairs")
    p.add_argument("--seed", type=int, default=e["seed"])
    p.add_argument("--out", metavar="DIR",
                   help="keep the artifact, its debug copy and evaluation set here "
                        "(default: a temporary folder, removed)")
    p.add_argument("--json", metavar="OUT", help="write the per-layer result as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the per-layer plot")


def options(args):
    """The command line -> `DebugOptions` (which checks itself)."""
    from hilq.quant.options import ExportOptions

    from .debug import DebugOptions

    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path and path != "-" and not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{flag} {path}: directory {Path(path).resolve().parent} "
                            "does not exist")
    return DebugOptions(
        model=model_ref(args), variant=args.variant,
        artifact=args.artifact, device=args.device, runtime=args.runtime,
        inventory=args.inventory, runtime_options=runtime_options(args),
        engine=not args.no_engine, samples=args.samples, build=ExportOptions(
            calib=args.calib, calib_data=args.calib_data, granularity=args.granularity,
            group_size=args.group_size, seed=args.seed,
            repairs=tuple(r.strip() for r in args.repair.split(",") if r.strip())))


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt=".2f"):
        return "—" if v is None else format(v, fmt)

    where = (f"{result['runtime']} on {result['device']}" if result.get("runtime")
             else "simulation only")
    t = Table(title=f"{result['model']} {result['variant']}: per-layer error vs float "
                    f"({where}, {result['n']} samples), worst first")
    for col in ("#", "layer", "prec", "SQNR dB", "sim dB", "gap", "cosine", "own dB",
                "own sim", "inherited"):
        t.add_column(col, justify="left" if col in ("layer", "prec") else "right")
    for i, r in enumerate(result["layers"], 1):
        t.add_row(str(i), r["layer"], str(r.get("precision") or ""), f(r["sqnr_db"]),
                  f(r["sqnr_db_simulated"]), f(r.get("gap_db"), "+.2f"), f(r["cosine"], ".5f"),
                  f(r["own_error_db"]), f(r.get("own_error_db_simulated")),
                  f(r.get("inherited_db")))
    console = Console(width=max(Console().width, 132))   # piped: rich's 80 would fold the table
    console.print(t)
    if result["culprits"]:
        first = next(r for r in result["layers"] if r["layer"] == result["culprits"][0])
        own = first["own_error_db"] if first["own_error_db"] is not None \
            else first.get("own_error_db_simulated")
        console.print(f"error introduced most at {first['layer']} (own error {f(own)} dB)",
                      highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)


def run(args) -> int:
    from . import debug_report
    from .debug import debug

    opts = options(args)
    keep = args.out is not None
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="hilq-debug-"))
    try:
        if keep:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
        result, code = debug(opts, out)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.plot:
        debug_report.plot(result, args.plot)
        result["plot"] = str(args.plot)
    print_table(result)
    write_json(args.json, result)
    return code
