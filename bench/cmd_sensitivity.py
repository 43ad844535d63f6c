"""`hilq sensitivity`: per-layer sensitivity table (ZeroQ KL or HAWQ Hessian trace).

    hilq sensitivity --model digits-cnn --method kl|hessian --bits 2,4,8 [--act-bits 8]
                     [--calib-data distilled|real|noise] [--samples 32] [--iters 100]
                     [--seed 0] [--json OUT] [--csv costs.csv]

Data-free by default: the batch is ZeroQ-distilled from the model's BatchNorm statistics.
`--csv` writes the allocator's cost-table format (`hilq allocate --table costs.csv`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from hilq.quant.options import SENSITIVITY_METHODS, SensitivityOptions
from hilq.quant.spec import CALIB_DATA

from .cli import add_model_arguments, console, defaults, model_ref
from .errors import UserError
from .output import write_json


def add_arguments(parser) -> None:
    d = defaults(SensitivityOptions)
    add_model_arguments(parser)
    parser.add_argument("--method", choices=SENSITIVITY_METHODS, default=d["method"],
                        help="kl: ZeroQ's output KL (default); hessian: HAWQ trace x weight error")
    parser.add_argument("--bits", default=",".join(map(str, d["bits"])),
                        help="weight bits to tabulate (default %(default)s)")
    parser.add_argument("--act-bits", type=int, default=d["act_bits"],
                        help="also quantize each layer's input to this many bits (kl), and "
                             "label precisions wXaA (default: weight-only, wXa16)")
    parser.add_argument("--calib-data", choices=CALIB_DATA, default=d["calib_data"],
                        help="the batch: distilled (ZeroQ, data-free; default), real, noise")
    for flag, name, kind, what in (
            ("--samples", "samples", int, "batch size"),
            ("--iters", "distill_iters", int, "distillation iterations (ZeroQ's paper runs 500)"),
            ("--lr", "lr", float, "distillation lr"),
            ("--hessian-iters", "hessian_iters", int, "maximum Hutchinson probes"),
            ("--tol", "tol", float, "Hutchinson relative convergence tolerance"),
            ("--seed", "seed", int, "seed")):
        parser.add_argument(flag, type=kind, default=d[name], help=f"{what} (default %(default)s)")
    parser.add_argument("--distill-objective", choices=("batch", "sample"),
                        default=d["distill_objective"],
                        help="batch (default) or sample (ZeroQ's reference code), see hilq "
                             "quantize --help")
    for which, zeroq in (("mean", "0 as ZeroQ"), ("std", "1")):
        parser.add_argument(f"--input-{which}", type=float, default=None,
                            help=f"distillation target {which} of the input (default: "
                                 f"photographs through the declared --preprocess, else {zeroq})")
    parser.add_argument("--json", metavar="PATH", help="write {method, table: [...]} as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the allocator's cost table (CSV)")


def options(args) -> SensitivityOptions:
    """The command line -> `SensitivityOptions` (which checks itself: one line, exit 2)."""
    try:
        bits = tuple(int(b) for b in args.bits.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--bits {args.bits!r}: expected integers such as 2,4,8") from None
    return SensitivityOptions(
        method=args.method, bits=bits, act_bits=args.act_bits, calib_data=args.calib_data,
        samples=args.samples, distill_iters=args.iters, lr=args.lr,
        distill_objective=args.distill_objective, input_mean=args.input_mean,
        input_std=args.input_std, hessian_iters=args.hessian_iters, tol=args.tol,
        seed=args.seed)


def _distill_progress(iters: int):
    """A rich progress bar and the callback `distill` calls after each step."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("distilling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4g}"), TimeRemainingColumn(),
                   transient=True, console=console(stderr=True))
    task = bar.add_task("distil", total=iters, loss=float("nan"))
    return bar, lambda i, n, loss: bar.update(task, completed=i, loss=loss)


def run(args) -> int:
    from hilq.quant.sensitivity import sensitivity

    o = options(args)
    bar, progress = _distill_progress(o.distill_iters) \
        if o.calib_data == "distilled" and o.distill_iters else (nullcontext(), None)
    with bar:
        res = sensitivity(model_ref(args), o, progress=progress)
    _print(res.table, args, res.seconds["data"], res.seconds["sensitivity"])
    write_json(args.json, res.to_dict())
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        res.table.to_csv(args.csv, index=False)
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
    console().print(t)
