"""The `hilq` command line. Each command lives in its own module `bench/cmd_<name>.py` with
`add_arguments(parser)` and `run(args) -> int`; this file only lists and dispatches them.

Errors a user can fix (bad flag, unknown model, missing file, unreachable device) print one
line and exit 2; a run that fails on the device exits 1. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, output
from .errors import UserError
from .output import console  # noqa: F401  (the commands' console, re-exported)

COMMANDS = {
    "quantize": "quantize a model to a variant: accuracy before/after, size, artifact",
    "export": "write a deployable artifact (ONNX Q/DQ) for a variant",
    "runtimes": "list the runtimes available here with versions and precisions",
    "bench": "benchmark variants on a device and runtime; measurements go to the store",
    "devices": "list or check the devices of an inventory",
    "sensitivity": "per-layer sensitivity table (ZeroQ KL or Hessian trace)",
    "allocate": "choose a precision per layer under budgets (ILP or Pareto DP)",
    "search": "hardware-aware allocation with costs measured on the device, re-benchmarked",
    "debug": "per-layer error, float vs quantized, on the engine and in simulation",
    "nightly": "the whole loop from a config: bench, search, store, regressions, report",
    "report": "render a Markdown + HTML report from the store",
    "compare": "two runs side by side per series: p50 ratio, CIs, faster/slower verdicts",
    "results": "export or inspect the results store",
    "config": "the JSON Schema of a config or inventory, or a Markdown reference of every key",
}


class Parser(argparse.ArgumentParser):
    """argparse that rejects a bad flag in one line (`hilq quantize: error: argument --w-bits:
    invalid int value: 'eight'`): the usage block is what `--help` is for, and in a CI log the
    seven to twelve lines before the error hide it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else message}\n")


MODEL_HELP = ("built-in name (digits-cnn, resnet18, resnet50, mobilenet_v2, tiny-transformer), "
              "package.module:factory returning an nn.Module, or a path to an FP32 .onnx file")


def add_model_arguments(p, *, required: bool = True, data_help: str = "") -> None:
    """The one model door and data door every command shares (quant.models, quant.data)."""
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--data", metavar="DIR|FILE|MODULE:FACTORY",
                   help="a folder of images (flat, or one sub-folder per class; calib/ and "
                        "test/ sub-folders give the splits), .npy/.npz arrays (x, optional y), "
                        "or package.module:factory returning hilq.quant.models.Data" + data_help)
    p.add_argument("--input-shape", metavar="[NAME=]N,C,H,W", action="append",
                   help="input shape with the batch first, for a model without data or an "
                        "ONNX file with dynamic dimensions; NAME=... sizes one input of a "
                        "file with several (repeatable)")
    p.add_argument("--route", choices=("auto", "torch", "onnx"), default="auto",
                   help="how an ONNX file's integer variants are built: through PyTorch "
                        "(onnx2torch), on the ONNX graph itself, or auto (PyTorch where the "
                        "file converts); the manifest records the route taken")
    p.add_argument("--metric", metavar="MODULE:FUNCTION",
                   help="your own figure of merit, computed on the device over the evaluation "
                        "set: fn(outputs, fp32_outputs, labels) -> {name: value}, higher is "
                        "better (a module that runs on its own: it travels in the set)")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="image preprocessing, torchvision's names: e.g. imagenet, or "
                        "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,"
                        "layout=NCHW,dtype=float32")


def model_ref(args):
    """The `quant.models.ModelRef` the model-door arguments name."""
    from hilq.quant.models import ModelRef, parse_shapes

    shape, named = parse_shapes(args.input_shape)
    return ModelRef(args.model, data=args.data, input_shape=shape, input_shapes=named,
                    preprocess=args.preprocess, route=args.route, metric=args.metric)


def add_runtime_option_argument(p) -> None:
    p.add_argument("--runtime-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting of the runtime (hilq runtimes lists them); "
                        "repeatable")


def runtime_options(args) -> dict:
    """`--runtime-option key=value`s, checked against the runtime's declared OPTIONS."""
    from hilq.devices.runtimes import check_options

    given = {}
    for item in args.runtime_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--runtime-option {item!r}: expected KEY=VALUE")
        given[key.strip()] = value.strip()
    try:
        return check_options(args.runtime, given)
    except ValueError as e:
        raise UserError(str(e)) from None


def defaults(options_class) -> dict:
    """{field: default} of a verb's options dataclass: the flags' defaults are the options'
    own, defined once on the dataclass."""
    from dataclasses import MISSING, fields

    return {f.name: f.default for f in fields(options_class) if f.default is not MISSING}


def _module(name: str):
    return importlib.import_module(f"hilq.bench.cmd_{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) just one command's arguments: `hilq --help` and
    `hilq nightly ...` import no other command's module (PyTorch loads only where used)."""
    parser = Parser(prog="hilq", description="Hardware-in-the-loop benchmarking "
                                     "of quantized neural networks.")
    parser.add_argument("--version", action="version", version=f"hilq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        output.add_arguments(p)
        if only is None or name == only:
            mod = _module(name)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from hilq.bench.store import StoreError
    from hilq.devices.errors import DeviceError
    from hilq.quant.spec import SpecError

    return (UserError, SpecError, FileNotFoundError, DeviceError, StoreError)


def _on_signals() -> None:
    """SIGINT and SIGTERM stop hilq the same way: every device waiting on an agent kills it
    (`devices.interrupt`), and the main thread unwinds through the `finally`s that release
    locks, remove session folders and mark the run `interrupted`."""
    import signal
    import threading

    from hilq.devices.interrupt import STOP, Interrupted, stop

    if threading.current_thread() is not threading.main_thread():
        return                      # signal handlers belong to the main thread

    def handler(signum, _frame):
        if STOP.is_set():           # already stopping: let the cleanup finish
            return
        name = signal.Signals(signum).name
        stop(name)
        raise Interrupted(name)

    STOP.clear()                    # a new command starts un-stopped

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _on_signals()
    try:
        with output.json_on_stdout(args):
            return int(args._run(args) or 0)
    except KeyboardInterrupt as e:   # devices.interrupt.Interrupted: SIGINT 130, SIGTERM 143
        print(f"hilq: interrupted ({getattr(e, 'signal_name', 'SIGINT')}): agents stopped, "
              "what was measured is stored", file=sys.stderr)
        return getattr(e, "code", 130)
    except Exception as e:  # noqa: BLE001 — only user errors are turned into one line
        if isinstance(e, _user_errors()):
            msg = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
        elif isinstance(e, OSError) and e.filename:   # a path the user gave: name it
            msg = f"{e.filename}: {e.strerror or type(e).__name__}"
        else:
            raise
        print(f"hilq {args.command}: error: {msg.splitlines()[0] if msg else msg}", file=sys.stderr)
        return 2
