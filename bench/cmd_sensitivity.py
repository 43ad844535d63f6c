"""`hilq sensitivity`: per-layer sensitivity table (ZeroQ KL or HAWQ Hessian trace).

    hilq sensitivity --model digits-cnn --method kl|hessian --bits 2,4,8 [--act-bits 8]
                     [--calib-data distilled|real|noise] [--samples 32] [--iters 100]
                     [--seed 0] [--json OUT] [--csv costs.csv]

Data-free by default: the batch is ZeroQ-distilled from the model's BatchNorm statistics.
`--csv` writes the allocator's cost-table format (`hilq allocate --table costs.csv`).
"""

from __future__ import annotations

import time
from pathlib import Path

from hilq.quant.sensitivity import METHODS, sensitivity_table
from hilq.quant.spec import CALIB_DATA, DISTILL_ITERS
from hilq.quant.zeroq import calibration_data, input_prior

from .cli import add_model_arguments, model_ref
from .cli import console as cli_console
from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--method", choices=METHODS, default="kl",
                        help="kl: ZeroQ's output KL (default); hessian: HAWQ trace x weight error")
    parser.add_argument("--bits", default="2,4,8", help="weight bits to tabulate (default 2,4,8)")
    parser.add_argument("--act-bits", type=int, default=None,
                        help="also quantize each layer's input to this many bits (kl), and "
                             "label precisions wXaA (default: weight-only, wXa16)")
    parser.add_argument("--calib-data", choices=CALIB_DATA, default="distilled",
                        help="the batch: distilled (ZeroQ, data-free; default), real, noise")
    parser.add_argument("--samples", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--iters", type=int, default=DISTILL_ITERS,
                        help=f"distillation iterations (default {DISTILL_ITERS}; ZeroQ's paper "
                             "runs 500)")
    parser.add_argument("--lr", type=float, default=0.5, help="distillation lr (default 0.5)")
    parser.add_argument("--distill-objective", choices=("batch", "sample"), default="batch",
                        help="batch (default) or sample (ZeroQ's reference code), see hilq "
                             "quantize --help")
    parser.add_argument("--input-mean", type=float, default=None,
                        help="distillation target mean of the input (default: photographs through "
                             "the declared --preprocess, else 0 as ZeroQ)")
    parser.add_argument("--input-std", type=float, default=None,
                        help="distillation target std of the input (default: photographs through "
                             "the declared --preprocess, else 1)")
    parser.add_argument("--hessian-iters", type=int, default=200,
                        help="maximum Hutchinson probes (default 200)")
    parser.add_argument("--tol", type=float, default=1e-3,
                        help="Hutchinson relative convergence tolerance (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write {method, table: [...]} as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the allocator's cost table (CSV)")


def _bits(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--bits {text!r}: expected integers such as 2,4,8") from None
    if not bits or any(not 1 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise UserError(f"--bits {text!r}: expected distinct integers in 1..8")
    return bits


def _distill_progress(iters: int):
    """A rich progress bar and the callback `distill` calls after each step."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("distilling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4g}"), TimeRemainingColumn(), transient=True)
    task = bar.add_task("distil", total=iters, loss=float("nan"))
    return bar, lambda i, n, loss: bar.update(task, completed=i, loss=loss)


def run(args) -> int:
    from hilq.quant.models import load_model

    bits = _bits(args.bits)
    for flag, value, least in (("--samples", args.samples, 1), ("--iters", args.iters, 0),
                               ("--hessian-iters", args.hessian_iters, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.act_bits is not None and not 1 <= args.act_bits <= 8:
        raise UserError(f"--act-bits must be in 1..8, got {args.act_bits}")
    entry = load_model(model_ref(args))
    model = entry.build().eval()
    calib_x = entry.data().calib_x if args.calib_data == "real" else None
    real = calib_x[: args.samples] if calib_x is not None else None
    kw = {}
    if args.calib_data == "distilled":
        kw = {"iters": args.iters, "lr": args.lr, "objective": args.distill_objective,
              **input_prior(entry.preprocess)}
        kw.update({k: v for k, v in (("input_mean", args.input_mean),
                                     ("input_std", args.input_std)) if v is not None})
    t0 = time.perf_counter()
    if args.calib_data == "distilled" and args.iters:
        bar, kw["progress"] = _distill_progress(args.iters)
        with bar:
            x = calibration_data("distilled", model, n=args.samples, input_shape=entry.input_shape,
                                 seed=args.seed, name=entry.name, **kw)
    else:
        x = calibration_data(args.calib_data, model, real=real, n=args.samples,
                             input_shape=entry.input_shape, seed=args.seed, name=entry.name, **kw)
    t1 = time.perf_counter()
    extra = ({"max_iters": args.hessian_iters, "tol": args.tol, "seed": args.seed}
             if args.method == "hessian" else {})
    df = sensitivity_table(model, x, bits, method=args.method, act_bits=args.act_bits, **extra)
    t2 = time.perf_counter()

    _print(df, args, t1 - t0, t2 - t1)
    if args.json:
        payload = {"method": args.method, "model": entry.name, "calib_data": args.calib_data,
                   "samples": len(x), "bits": bits, "act_bits": args.act_bits,
                   "seconds": {"data": t1 - t0, "sensitivity": t2 - t1},
                   "table": df.to_dict("records")}
        write_json(args.json, payload)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    return 0


def _print(df, args, data_s: float, sens_s: float) -> None:
    from rich.table import Table

    precisions = list(dict.fromkeys(df["precision"]))
    t = Table(title=f"{args.method} sensitivity of {args.model} on {args.calib_data} data "
                    f"({data_s:.1f} s data, {sens_s:.1f} s sensitivity)")
    t.add_column("layer")
    for p in precisions:
        t.add_column(p, justify="right")
    for layer, rows in df.groupby("layer", sort=False):
        values = dict(zip(rows["precision"], rows["sensitivity"]))
        t.add_row(layer, *[f"{values[p]:.4g}" if p in values else "" for p in precisions])
    cli_console().print(t)
