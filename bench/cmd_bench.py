"""`hilq bench`: variants of a model × devices, on one runtime, measured in alternating
rounds by the on-device agent (devices one after another, each exclusive); the measurements
go into the results store (`--db`, default `results/hilq.sqlite`; `--no-store` to skip);
prints a table and writes `--json OUT` with `measurements`."""

from __future__ import annotations

from dataclasses import fields

from hilq.bench.cli import (
    add_model_arguments,
    add_runtime_option_argument,
    model_ref,
    runtime_options,
)
from hilq.bench.errors import UserError
from hilq.devices.runtimes import NAMES
from hilq.devices.scenario import SCENARIOS
from hilq.quant.artifact import Artifact

from hilq.measurement import Protocol

from .benchmark import BenchOptions, bench
from .output import Output, write_json

# Protocol fields settable from the command line: --min-iters, --min-duration-s, ...
_PROTOCOL_FLAGS = ("warmup_iters", "warmup_s", "min_iters", "min_duration_s", "max_iters",
                   "max_duration_s", "threads", "mode", "power", "idle_s", "seed",
                   "scenario", "target_qps", "target_latency_ms", "samples_per_query",
                   "min_queries")
_REPORTED = ("variant", "device", "runtime", "status", "failure", "reason", "latency_ms",
             "throughput", "energy_j_per_inference", "facts", "model", "power", "load",
             "rounds", "protocol", "artifact_sha256", "harness_overhead_ms", "kernels",
             "device_latency_ms", "outputs_check", "timing", "accuracy", "memory", "scenario")


def add_arguments(p):
    add_model_arguments(p, required=False)
    p.add_argument("--calib-data", default="real",
                   help="calibration inputs of the INT8 variants: real (--data, default), "
                        "distilled (ZeroQ), noise")
    p.add_argument("--variants", default="fp32", help="comma-separated: fp32,w8a8,...")
    p.add_argument("--artifact", action="append", default=[], metavar="FILE",
                   help="a prebuilt artifact (FILE + FILE.manifest.json); repeatable")
    p.add_argument("--device", default="local",
                   help="device name(s) from the inventory, comma-separated (default local)")
    p.add_argument("--runtime", default="ort", choices=NAMES)
    p.add_argument("--inventory", help="devices.toml (not needed for --device local)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--reference", help=".npz of input:/output: arrays for the answer check")
    p.add_argument("--affinity", help="CPU ids to pin the agent to, e.g. 0,1")
    p.add_argument("--batch", default="1", metavar="N[,N...]",
                   help="batch size; a list (1,8,32) sweeps it: one measurement per batch, "
                        "named VARIANT@bN, and a batch-sweep plot in the report (default 1)")
    p.add_argument("--seq-len", metavar="L[,L...]",
                   help="sequence length of a sequence model (tiny-transformer); a list "
                        "(16,64,128) sweeps it: one static-shape artifact and measurement per "
                        "length, named VARIANT@sL (VARIANT@bNsL with a --batch sweep), and a "
                        "sequence-length plot in the report (default: the model's own)")
    add_runtime_option_argument(p)
    defaults = Protocol()
    helps = {"scenario": "an MLPerf scenario run through LoadGen after hilq's own timing: "
                         + ", ".join(SCENARIOS) + " (default: none)"}
    for name in _PROTOCOL_FLAGS:
        kind = type(getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=helps.get(name, f"protocol {name} (default {getattr(defaults, name)})"))
    p.add_argument("--db", "--store", dest="db", metavar="URL|PATH",
                   help="results store (SQLite path or database URL; default $HILQ_DB or "
                        "results/hilq.sqlite)")
    p.add_argument("--no-store", action="store_true", help="measure without storing")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write measurements as JSON")


def accuracy_json(acc: dict) -> dict | None:
    """The documented `accuracy` object of `--json`: fractions in 0..1, null where unknown
    (no labels, no reference), plus the rest of what the device returned."""
    if not acc:
        return None
    keys = ("top1", "agreement_fp32", "kl", "sqnr_db", "simulated_top1", "n")
    return {**{k: acc.get(k) for k in keys}, **{k: v for k, v in acc.items() if k not in keys}}


def _accuracy_cells(acc: dict) -> str:
    """Top-1 (device, simulated) and agreement where the model outputs class scores; for
    every model the worst output's SQNR, and the task figure of outputs that have one."""
    pct = lambda x, w: f"{100 * x:{w}.2f}" if isinstance(x, float) else "-".rjust(w)  # noqa: E731
    acc = acc or {}
    sqnrs = [o["sqnr_db"] for o in acc.get("outputs") or [] if o.get("sqnr_db") is not None]
    worst = f"{min(sqnrs):8.1f}" if sqnrs else "-".rjust(8)
    task = " ".join(f"{k} {v:.3f}" for k, v in (acc.get("task") or {}).items()
                    if isinstance(v, float))
    return (f"{pct(acc.get('top1'), 9)} {pct(acc.get('simulated_top1'), 6)} "
            f"{pct(acc.get('agreement_fp32'), 6)} {worst}" + (f"  {task}" if task else ""))


def _protocol(args) -> Protocol:
    values = {n: getattr(args, n) for n in _PROTOCOL_FLAGS if getattr(args, n) is not None}
    if args.affinity:
        try:
            values["affinity"] = [int(c) for c in args.affinity.split(",")]
        except ValueError:
            raise UserError(f"--affinity {args.affinity!r}: expected CPU ids, e.g. 0,1") from None
    if values.get("mode", "latency") not in ("latency", "throughput"):
        raise UserError(f"--mode {values['mode']!r}: use latency or throughput")
    if values.get("scenario", "") not in ("", *SCENARIOS):
        raise UserError(f"--scenario {values['scenario']!r}: use {', '.join(SCENARIOS)}")
    values["runtime_options"] = runtime_options(args)
    assert {f.name for f in fields(Protocol)} >= set(values)
    return Protocol.from_dict(values)


def sizes(text: str, flag: str = "--batch", example: str = "1,8,32") -> list[int]:
    """`1,8,32` -> [1, 8, 32]: positive, no repeats, in the order given (a shape sweep)."""
    try:
        out = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected positive integers, e.g. {example}") from None
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise UserError(f"{flag} {text!r}: expected distinct positive integers, e.g. {example}")
    return out


def options(args) -> BenchOptions:
    """The command line -> `BenchOptions` (which checks itself: one line, exit 2)."""
    if not args.model and not args.artifact:
        raise UserError("give --model (with --variants) or --artifact FILE")
    if args.seq_len is not None and args.artifact:
        raise UserError("--seq-len builds one artifact per length from --model; a prebuilt "
                        "--artifact has its own fixed shape")
    variants = [Artifact.load(a) for a in args.artifact] if args.artifact else \
        [v.strip() for v in args.variants.split(",") if v.strip()]
    return BenchOptions(
        variants=variants, devices=[d.strip() for d in args.device.split(",") if d.strip()],
        runtime=args.runtime, rounds=args.rounds, batches=sizes(args.batch),
        seq_lens=[None] if args.seq_len is None else sizes(args.seq_len, "--seq-len", "16,64,128"),
        reference=args.reference, calib_data=args.calib_data, protocol=_protocol(args),
        inventory=args.inventory, db=args.db, store=not args.no_store)


def run(args) -> int:
    o, out = options(args), Output.of(args)
    with out.progress("bench", o.agent_runs):
        res = bench(model_ref(args) if args.model else "", o, say=out.say)
    ms = res.measurements
    _print_table(ms)
    if args.json_out:
        doc = {"measurements": [{k: m.to_dict()[k] for k in _REPORTED} for m in ms]}
        for row in doc["measurements"]:
            row["accuracy"] = accuracy_json(row["accuracy"])
        write_json(args.json_out, doc)
    invalid = [m for m in ms if m.scenario and not m.scenario.get("valid")]
    if invalid:
        print(f"LoadGen judged {len(invalid)} scenario run(s) INVALID: "
              + "; ".join(f"{m.variant}: {', '.join(m.scenario.get('reasons') or ['?'])}"
                          for m in invalid))
    return 0 if res.ok and not invalid else 1


def _print_table(ms: list) -> None:
    """One line per measurement: status, latency percentiles, spread, throughput, energy and
    the accuracy figures measured on the device; failures and notes under it."""
    print(f"{'device':10} {'variant':10} {'status':8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
          f"{'cv(p50)':>8} {'samples/s':>10} {'J/inf':>9} {'top-1 dev':>9} {'sim':>6} "
          f"{'agree':>6} {'SQNR dB':>8}")

    def f(x, fmt="9.3f"):
        return format(x, fmt) if isinstance(x, (int, float)) else "-".rjust(int(fmt.split(".")[0]))

    for m in ms:
        lat = m.latency_ms or {}
        cv = (m.rounds or {}).get("cv_p50")
        print(f"{m.device:10} {m.variant:10} {m.status:8} {f(lat.get('p50'))} {f(lat.get('p90'))} "
              f"{f(lat.get('p99'))} {f(cv, '8.2%')} {f(m.throughput, '10.1f')} "
              f"{f(m.energy_j_per_inference, '9.4f')} {_accuracy_cells(m.accuracy)}"
              + (f"  {m.failure}: {m.reason}" if not m.ok else ""))
        if m.ok and m.reason:
            print(f"{'':21} note: {m.reason}")
        if m.scenario:
            print(f"{'':21} {scenario_line(m)}")


def scenario_line(m) -> str:
    """One line of LoadGen's verdict, beside hilq's own figure and the Python SUT's own
    per-query cost, which LoadGen's latencies carry and hilq's do not."""
    sc = m.scenario
    v, unit = sc.get("value"), sc.get("unit")
    fig = f"{v:.3f} ms" if unit == "ms" and v is not None else \
        f"{v:.1f} samples/s" if v is not None else "-"
    line = f"LoadGen {sc.get('scenario')}: {sc.get('result')}, {sc.get('metric')} {fig}"
    own, over, beside = (m.latency_ms or {}).get("p90"), sc.get("sut_overhead_ms"), []
    if sc.get("scenario") == "single-stream" and own and v:
        beside.append(f"hilq p90 {own:.3f} ms, {100 * (v - own) / own:+.1f}%")
    if over is not None:
        beside.append(f"SUT overhead {over:.3f} ms per query")
    if beside:
        line += f" ({'; '.join(beside)})"
    if sc.get("early_stopping_ms"):
        line += f", early-stopping estimate {sc['early_stopping_ms']:.3f} ms"
    if not sc.get("valid"):
        line += f": {'; '.join(sc.get('reasons') or [])}"
    return line
