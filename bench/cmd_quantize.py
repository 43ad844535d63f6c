"""`hilq quantize`: a model to a variant — accuracy before and after, weight size, time.

    hilq quantize --model digits-cnn --w-bits 4 --a-bits 4 [--granularity channel|tensor|group]
                  [--group-size 128] [--calib minmax|percentile|mse|entropy|ema]
                  [--repair cle,split,bias,adaround] [--calib-data real|distilled|noise]
                  [--qat-epochs N] [--data DIR|FILE|MODULE:FACTORY] [--input-shape N,C,H,W]
                  [--preprocess SPEC] [--seed 0] [--json OUT]

Weights are symmetric (per output channel by default); activations are asymmetric per
tensor, calibrated statically. `--a-bits 16` keeps activations float (weight-only, `w4a16`).
Accuracies are fractions in 0..1; models without labels report agreement with FP32 instead.
"""

from __future__ import annotations

from pathlib import Path

from hilq.quant.options import QuantizeOptions
from hilq.quant.spec import CALIBRATIONS, GRANULARITIES

from .cli import add_model_arguments, defaults, model_ref
from .cli import console as cli_console
from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    d = defaults(QuantizeOptions)
    add_model_arguments(parser, data_help="; overrides a built-in model's data")
    parser.add_argument("--w-bits", type=int, required=True, help="weight bits, 1..8")
    parser.add_argument("--a-bits", type=int, required=True,
                        help="activation bits, 1..8, or 16 for weight-only (float activations)")
    parser.add_argument("--granularity", default=d["granularity"],
                        help=f"weight granularity: {', '.join(GRANULARITIES)} (default channel)")
    parser.add_argument("--group-size", type=int, default=d["group_size"],
                        help="group size for --granularity group (default %(default)s)")
    parser.add_argument("--calib", default=d["calib"],
                        help=f"activation range method: {', '.join(CALIBRATIONS)} (default minmax)")
    parser.add_argument("--repair", default="",
                        help="comma-separated PTQ repairs: cle, split, bias, adaround "
                             "(applied in that order)")
    parser.add_argument("--adaround-iters", type=int, default=d["adaround_iters"],
                        help="AdaRound iterations per layer (default %(default)s)")
    parser.add_argument("--calib-data", default=d["calib_data"],
                        help="calibration inputs: real (default), distilled (ZeroQ), noise")
    parser.add_argument("--distill-iters", type=int, default=d["distill_iters"],
                        help="ZeroQ iterations for --calib-data distilled (default "
                             "%(default)s; ZeroQ's paper runs 500)")
    parser.add_argument("--distill-objective", choices=("batch", "sample"),
                        default=d["distill_objective"],
                        help="batch: match the batch's BatchNorm statistics from N(0,1) "
                             "(default); sample: ZeroQ's reference code, every sample's own "
                             "statistics from near-zero uniform noise")
    parser.add_argument("--qat-epochs", type=int, default=d["qat_epochs"],
                        help="quantization-aware fine-tuning epochs after PTQ (default 0)")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")


def options(args) -> QuantizeOptions:
    """The command line -> `QuantizeOptions` (which checks itself: one line, exit 2)."""
    if args.json and args.json != "-":
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: directory {parent} does not exist")
    return QuantizeOptions(
        w_bits=args.w_bits, a_bits=args.a_bits, granularity=args.granularity,
        group_size=args.group_size, calib=args.calib, repairs=args.repair,
        adaround_iters=args.adaround_iters, calib_data=args.calib_data,
        distill_iters=args.distill_iters, distill_objective=args.distill_objective,
        qat_epochs=args.qat_epochs, seed=args.seed)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def print_table(out: dict) -> None:
    from rich.table import Table

    title = (f"{out['model']} → {out['variant']} ({out['granularity']} weights, "
             f"{out['calib']} on {out['calib_data']} data"
             + (f", repairs: {', '.join(out['repairs'])}" if out["repairs"] else "") + ")")
    t = Table(title=title)
    for col in ("", "top-1", "agree w/ FP32", "weights", "time"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("FP32", _pct(out["fp32_top1"]), "", _size(out["fp32_size_bytes"]), "")
    delta = "" if out["top1_delta"] is None else f" ({100 * out['top1_delta']:+.2f} pt)"
    t.add_row(out["variant"].upper(), _pct(out["quant_top1"]) + delta,
              _pct(out["agreement_top1"]),
              f"{_size(out['quant_size_bytes'])} ({out['compression']:.2f}x)",
              f"{out['seconds']:.1f} s")
    console = cli_console()
    console.print(t)
    for note in out["notes"]:
        console.print(f"note: {note}", highlight=False)


def run(args) -> int:
    from hilq.quant.quantize import quantize

    out = quantize(model_ref(args), options(args))
    print_table(out)
    write_json(args.json, dict(sorted(out.items())))
    return 0
