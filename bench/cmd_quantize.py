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

import platform
from pathlib import Path

from hilq.quant.spec import CALIBRATIONS, DISTILL_ITERS, GRANULARITIES

from .cli import add_model_arguments, model_ref
from .cli import console as cli_console
from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    add_model_arguments(parser, data_help="; overrides a built-in model's data")
    parser.add_argument("--w-bits", type=int, required=True, help="weight bits, 1..8")
    parser.add_argument("--a-bits", type=int, required=True,
                        help="activation bits, 1..8, or 16 for weight-only (float activations)")
    parser.add_argument("--granularity", default="channel",
                        help=f"weight granularity: {', '.join(GRANULARITIES)} (default channel)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="group size for --granularity group (default 128)")
    parser.add_argument("--calib", default="minmax",
                        help=f"activation range method: {', '.join(CALIBRATIONS)} (default minmax)")
    parser.add_argument("--repair", default="",
                        help="comma-separated PTQ repairs: cle, split, bias, adaround "
                             "(applied in that order)")
    parser.add_argument("--adaround-iters", type=int, default=300,
                        help="AdaRound iterations per layer (default 300)")
    parser.add_argument("--calib-data", default="real",
                        help="calibration inputs: real (default), distilled (ZeroQ), noise")
    parser.add_argument("--distill-iters", type=int, default=DISTILL_ITERS,
                        help=f"ZeroQ iterations for --calib-data distilled (default "
                             f"{DISTILL_ITERS}; ZeroQ's paper runs 500)")
    parser.add_argument("--distill-objective", choices=("batch", "sample"), default="batch",
                        help="batch: match the batch's BatchNorm statistics from N(0,1) "
                             "(default); sample: ZeroQ's reference code, every sample's own "
                             "statistics from near-zero uniform noise")
    parser.add_argument("--qat-epochs", type=int, default=0,
                        help="quantization-aware fine-tuning epochs after PTQ (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")


def _validate(args) -> None:
    from hilq.quant.spec import CALIB_DATA

    if not 1 <= args.w_bits <= 8:
        raise UserError(f"--w-bits must be 1..8, got {args.w_bits}")
    if not (1 <= args.a_bits <= 8 or args.a_bits == 16):
        raise UserError(f"--a-bits must be 1..8 (or 16 for weight-only), got {args.a_bits}")
    if args.granularity not in GRANULARITIES:
        raise UserError(f"unknown --granularity {args.granularity!r} "
                        f"(use {', '.join(GRANULARITIES)})")
    if args.granularity == "group" and args.group_size < 1:
        raise UserError(f"--group-size must be positive, got {args.group_size}")
    if args.calib not in CALIBRATIONS:
        raise UserError(f"unknown --calib method {args.calib!r} (use {', '.join(CALIBRATIONS)})")
    if args.calib_data not in CALIB_DATA:
        raise UserError(f"unknown --calib-data {args.calib_data!r} (use {', '.join(CALIB_DATA)})")
    if args.qat_epochs < 0:
        raise UserError(f"--qat-epochs must be >= 0, got {args.qat_epochs}")
    if args.adaround_iters < 1:
        raise UserError(f"--adaround-iters must be positive, got {args.adaround_iters}")
    if args.json and args.json != "-":
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: directory {parent} does not exist")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def result_dict(args, entry, res, variant: str, repairs: tuple[str, ...]) -> dict:
    import torch

    data_name = entry.data().name if args.data is None else args.data
    delta = (None if res.fp32_top1 is None else res.quant_top1 - res.fp32_top1)
    return {
        "model": entry.name,
        "variant": variant,
        "w_bits": args.w_bits,
        "a_bits": None if args.a_bits == 16 else args.a_bits,
        "granularity": args.granularity,
        "group_size": args.group_size if args.granularity == "group" else None,
        "calib": args.calib,
        "calib_data": args.calib_data,
        "repairs": list(repairs),
        "qat_epochs": args.qat_epochs,
        "seed": args.seed,
        "data": data_name,
        "fp32_top1": res.fp32_top1,
        "quant_top1": res.quant_top1,
        "top1_delta": delta,
        "agreement_top1": res.agreement.top1 if res.agreement else None,
        "max_abs_diff": res.agreement.max_abs_diff if res.agreement else None,
        "mean_abs_diff": res.agreement.mean_abs_diff if res.agreement else None,
        "fp32_size_bytes": res.fp32_size_bytes,
        "quant_size_bytes": res.quant_size_bytes,
        "compression": res.compression,
        "bit_config": res.bit_config.to_dict(),
        "seconds": res.seconds,
        "notes": res.notes,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


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
    from hilq.quant.models import load_model
    from hilq.quant.pipeline import parse_repairs, quantize_model, variant_bit_config

    _validate(args)
    try:
        repairs = parse_repairs(args.repair)
    except ValueError as e:
        raise UserError(str(e).replace("unknown repair", "unknown --repair item")) from None
    entry = load_model(model_ref(args))
    model = entry.build()
    variant = f"w{args.w_bits}a{args.a_bits}"
    notes: list[str] = []
    config = variant_bit_config(model, variant, granularity=args.granularity, calib=args.calib,
                                group_size=args.group_size, notes=notes)
    res = quantize_model(entry, config, repairs=repairs, calib_data=args.calib_data,
                         distill_iters=args.distill_iters,
                         distill_objective=args.distill_objective,
                         qat_epochs=args.qat_epochs, seed=args.seed, model=model,
                         adaround_iters=args.adaround_iters)
    res.notes[:0] = notes
    out = result_dict(args, entry, res, variant, repairs)
    print_table(out)
    write_json(args.json, dict(sorted(out.items())))
    return 0
