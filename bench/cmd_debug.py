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

import json
import shutil
import tempfile
from pathlib import Path

from .cli import (
    UserError,
    add_model_arguments,
    add_runtime_option_argument,
    model_ref,
    runtime_options,
)

GAP_DB = 1.0   # engine vs simulation agreement asked of every layer


def add_arguments(p) -> None:
    from devices.runtimes import NAMES

    add_model_arguments(p, required=False)
    p.add_argument("--variant", help="w8a8, w4a8, ... or config:PATH.json (with --model)")
    p.add_argument("--artifact", metavar="FILE", help="an exported artifact (FILE + manifest)")
    p.add_argument("--device", default="local", help="device from the inventory (default local)")
    p.add_argument("--runtime", default="ort", choices=NAMES,
                   help="engine that runs the debug copy (ort or openvino; default ort)")
    p.add_argument("--inventory", help="devices.toml (not needed for --device local)")
    add_runtime_option_argument(p)
    p.add_argument("--no-engine", action="store_true", help="simulation only, no device run")
    p.add_argument("--samples", type=int, default=64, help="test inputs compared (default 64)")
    p.add_argument("--calib", default="minmax", help="activation calibration method")
    p.add_argument("--calib-data", default="real", help="real | distilled | noise")
    p.add_argument("--granularity", default="channel", choices=("channel", "tensor", "group"))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--repair", default="", help="comma-separated PTQ repairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR",
                   help="keep the artifact, its debug copy and evaluation set here "
                        "(default: a temporary folder, removed)")
    p.add_argument("--json", metavar="OUT", help="write the per-layer result as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the per-layer plot")


def _validate(args) -> None:
    if bool(args.artifact) == bool(args.variant):
        raise UserError("give --model M --variant V, or --artifact FILE")
    if args.variant and not args.model:
        raise UserError("--variant needs --model")
    if args.samples < 1:
        raise UserError(f"--samples must be positive, got {args.samples}")
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{flag} {path}: directory {Path(path).resolve().parent} "
                            "does not exist")


def _artifact(args, out: Path):
    from quant.artifact import Artifact
    from quant.export import build_artifact
    from quant.models import ModelRef, parse_shapes

    from .runner import target_for

    if args.artifact:
        try:
            art = Artifact.load(args.artifact)
        except ValueError as e:
            raise UserError(str(e)) from None
        shape, named = parse_shapes(args.input_shape)
        ref = ModelRef(args.model or art.manifest.get("model", ""), data=args.data,
                       input_shape=shape, input_shapes=named, preprocess=args.preprocess)
        return art, ref
    repairs = tuple(r.strip() for r in args.repair.split(",") if r.strip())
    target, device = target_for(args.runtime)
    art = build_artifact(model_ref(args), args.variant, out, target, device=device,
                         calib=args.calib, granularity=args.granularity,
                         group_size=args.group_size, repairs=repairs, seed=args.seed,
                         calib_data=args.calib_data)
    return art, model_ref(args)


def _engine(args, dbg, taps, arrays, out: Path, model: str, data_name: str):
    """The debug copy over its evaluation set, by the device's agent: a Measurement."""
    from devices import inventory
    from devices.measurement import Protocol
    from quant import evalset

    ev = evalset.write(out, arrays, model, data_name)
    device = inventory.open_device(args.device, inventory.load(args.inventory))
    protocol = Protocol(warmup_iters=1, warmup_s=0.0, min_iters=1, min_duration_s=0.0,
                        idle_s=0.0,   # timing is not the point: one pass, then the eval set
                        runtime_options=runtime_options(args))
    try:
        return device.run(dbg, protocol, args.runtime, evalset=ev), ev
    finally:
        device.close()


def debug(args, out: Path) -> tuple[dict, int]:
    """The whole command but printing: (result, exit code)."""
    from quant import debug as qd
    from quant.debug_onnx import write_debug_artifact
    from quant.models import load_model

    art, ref = _artifact(args, out)
    m = art.manifest
    if not m.get("layer_map") or m.get("format") != "onnx-qdq":
        raise UserError(f"artifact {art.path} is not an ONNX Q/DQ export with a layer map "
                        f"(format {m.get('format')}): nothing quantized to debug")
    entry = load_model(ref)
    try:
        dbg, taps = write_debug_artifact(art, out / "debug")
    except ValueError as e:   # no layer of the map left in the graph
        raise UserError(str(e)) from None
    side = _graph_side if (m.get("settings") or {}).get("route") == "onnx" else _torch_side
    sim, arrays, notes, data_name, n = side(args, art, entry, ref, taps)
    if side is _graph_side:
        from quant.graph_debug import debug_input_shapes

        dbg = debug_input_shapes(dbg, arrays)
    info = {v["layer"]: {"op": v["op"], "precision": v["precision"]}
            for v in m["layer_map"].values()}
    result = {"model": m.get("model"), "variant": m.get("variant"),
              "runtime": None if args.no_engine else args.runtime,
              "device": None if args.no_engine else args.device,
              "n": n, "artifact": art.path, "artifact_sha256": art.sha256,
              "debug_artifact_sha256": dbg.sha256, "status": "simulated", "notes": notes}
    code, engine, flags = 0, None, None
    if not args.no_engine:
        meas, ev = _engine(args, dbg, taps, arrays, out, str(m.get("model")), data_name)
        result.update(status=meas.status, failure=meas.failure, reason=meas.reason,
                      eval_sha256=ev.sha256, kernels=meas.kernels or None,
                      engine=(meas.facts or {}).get("engine"))
        acc = meas.accuracy or {}
        result.update({k: acc.get(k) for k in ("top1", "agreement_fp32", "sqnr_db")})
        if meas.ok and acc.get("outputs"):
            engine = qd.engine_rows(taps, acc["outputs"])
            flags = result["cpu_flags"] = ((meas.facts or {}).get("cpu") or {}).get("flags")
        else:
            code = 1
            notes.append(f"engine run failed: {meas.failure}: {meas.reason}")
    rows = qd.merge(sim, engine, info)
    result["layers"] = rows
    result["culprits"] = qd.culprits(rows)
    notes += _gap_notes(rows, args.runtime if engine is not None else None, flags)
    return result, code


def _torch_side(args, art, entry, ref, taps):
    """The PyTorch route's simulation: hilq's fake-quant model rebuilt from the manifest.
    Returns (simulated rows, the debug copy's evaluation set, notes, data name, n)."""
    import torch

    from quant import debug as qd

    m = art.manifest
    res = qd.fake_quant_model(entry, m)
    notes = []
    dev = qd.reference_deviation(art, res.qmodel)
    if dev is not None and dev > 1e-4:
        notes.append(f"the fake-quant model rebuilt from the manifest differs from the one "
                     f"exported (max |Δ| {dev:.3g} on the reference inputs): simulated "
                     "figures describe the rebuilt model")
    data = entry.data()
    pool, labels = (data.test_x, data.test_y) if data.test_x is not None and len(data.test_x) \
        else (data.calib_x, None)
    x = pool[: args.samples]
    labels = labels[: args.samples] if labels is not None else None
    with torch.no_grad():
        cap = qd.capture(res.fmodel, res.qmodel, x, [t.layer for t in taps if t.kind == "chain"])
    sim = qd.simulated(cap, taps, qd.deployed_chain(res.qmodel, x, taps))
    arrays = qd.evalset_arrays(cap, taps, m["input_name"], len(m.get("output_names") or [1]),
                               labels)
    return sim, arrays, notes, data.name, len(x)


def _graph_side(args, art, entry, ref, taps):
    """The ONNX route's simulation: the graphs run by ONNX Runtime with Q/DQ as written
    (`quant.graph_debug`); same return as `_torch_side`."""
    from quant import debug as qd
    from quant import graph_debug
    from quant.onnx_feeds import load_feeds

    feeds = load_feeds(entry, ref.data, ref.preprocess, args.seed)
    n = min(args.samples, len(feeds))
    cap = graph_debug.capture(art, entry, feeds, n)
    sim = qd.simulated(cap, taps)
    labels = feeds.labels[:n] if feeds.labels is not None else None
    arrays = graph_debug.evalset_arrays(cap, taps, entry, feeds, n, labels)
    return sim, arrays, ["ONNX route: the simulation is the graph itself, run by ONNX Runtime "
                         "with Q/DQ executed as written"], feeds.name, n


def _saturates(runtime: str | None, flags: dict | None) -> bool:
    """ONNX Runtime on an x86 CPU with AVX2 but no VNNI multiplies u8×s8 with VPMADDUBSW,
    which sums each pair of products in int16 with saturation (ORT's quantization guide:
    'reduce_range or the U8U8 format' avoids it); VNNI sums in int32."""
    f = flags or {}
    return runtime == "ort" and bool(f.get("avx2")) and not (
        f.get("avx512_vnni") or f.get("avx_vnni") or f.get("amx_int8"))


def _gap_notes(rows: list[dict], runtime: str | None = None,
               flags: dict | None = None) -> list[str]:
    """Layers whose engine and simulated SQNR differ by more than GAP_DB, grouped by what the
    deployed-graph simulation (`sqnr_db_deployed_sim`) says about them, and by what the
    device's CPU says about the rest."""
    over = [r for r in sorted(rows, key=lambda r: r["index"])
            if r.get("gap_db") is not None and abs(r["gap_db"]) > GAP_DB]
    dep = lambda r: r.get("sqnr_db_deployed_sim")  # noqa: E731
    explained = [r for r in over if dep(r) is not None and abs(r["sqnr_db"] - dep(r)) <= GAP_DB]
    out = []
    if explained:
        worst = max(explained, key=lambda r: abs(r["gap_db"]))
        resid = max(abs(r["sqnr_db"] - dep(r)) for r in explained)
        out.append(f"{len(explained)} layer(s) differ from the simulation by more than "
                   f"{GAP_DB:g} dB (worst {worst['layer']}: {worst['gap_db']:+.2f} dB): "
                   f"{', '.join(r['layer'] for r in explained)}. With the exported graph's "
                   f"output Q nodes simulated they agree within {resid:.2f} dB: the export "
                   "quantizes tensors the fake-quant model keeps float (conv outputs feeding "
                   "a residual Add, the skip operand)")
    for r in over:
        if r not in explained:
            why = ("the engine's own arithmetic: this CPU has AVX2 without VNNI, where "
                   "ONNX Runtime sums u8×s8 product pairs in int16 with saturation "
                   "(VPMADDUBSW); 7-bit weights (reduce_range) or a VNNI CPU avoid it"
                   if _saturates(runtime, flags) else
                   "the engine's own arithmetic (kernels, fusions, saturation)")
            out.append(f"{r['layer']}: engine {r['sqnr_db']:.2f} dB vs simulated "
                       f"{r['sqnr_db_simulated']:.2f} dB ({r['gap_db']:+.2f}), not explained "
                       f"by the exported graph's Q nodes: {why}")
    return out


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

    _validate(args)
    keep = args.out is not None
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="hilq-debug-"))
    try:
        if keep:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
        result, code = debug(args, out)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.plot:
        debug_report.plot(result, args.plot)
        result["plot"] = str(args.plot)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return code
