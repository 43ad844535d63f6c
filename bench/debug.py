"""The debug verb: which layer loses the accuracy — per-layer error, float vs quantized.

For every quantized layer: output SQNR (dB) and cosine similarity against the float model,
on the engine (the artifact's debug copy, each layer's output exposed as a graph output, run
by the device's agent over an evaluation set like every measurement) and in simulation; and
each layer's own error (the layer fed the float model's input) against the error it
inherits. A gap over `GAP_DB` between engine and simulation is explained where it can be
measured. `hilq debug` (cmd_debug) and the nightly's search both call `debug(DebugOptions)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hilq.quant.options import ExportOptions

from .errors import UserError

GAP_DB = 1.0   # engine vs simulation agreement asked of every layer


@dataclass(frozen=True)
class DebugOptions:
    """What to debug and where. Either `variant` (built from `model`) or a prebuilt
    `artifact`; checks itself on construction, so a bad value is one line before any work."""

    model: object = None               # quant.models.ModelRef (the model door)
    variant: str | None = None         # w8a8, w4a8, ... or config:PATH.json
    artifact: str | None = None        # an exported artifact instead of a variant
    device: str = "local"
    runtime: str = "ort"
    inventory: str | None = None       # devices.toml (not needed for local)
    runtime_options: dict = field(default_factory=dict)   # checked by the runtime's OPTIONS
    engine: bool = True                # False: simulation only, no device run
    samples: int = 64
    # how the variant is built (calibration, granularity, repairs, seed): the build verb's
    # own options, their target set from the runtime when built
    build: ExportOptions = field(default_factory=ExportOptions)

    def __post_init__(self):
        if bool(self.artifact) == bool(self.variant):
            raise UserError("give --model M --variant V, or --artifact FILE")
        if self.variant and not (self.model and self.model.name):
            raise UserError("--variant needs --model")
        if self.samples < 1:
            raise UserError(f"--samples must be positive, got {self.samples}")


def _artifact(o: DebugOptions, out: Path):
    from dataclasses import replace

    from hilq.quant.artifact import Artifact
    from hilq.quant.export import build_artifact
    from hilq.quant.models import ModelRef

    from .runner import target_for

    if o.artifact:
        try:
            art = Artifact.load(o.artifact)
        except ValueError as e:
            raise UserError(str(e)) from None
        ref = o.model or ModelRef("")
        return art, (ref if ref.name else replace(ref, name=art.manifest.get("model", "")))
    target, device = target_for(o.runtime)
    art = build_artifact(o.model, o.variant, out,
                         options=replace(o.build, target=target, device=device))
    return art, o.model


def _engine(o: DebugOptions, dbg, arrays, out: Path, model: str, data_name: str):
    """The debug copy over its evaluation set, by the device's agent: a Measurement."""
    from hilq.devices import inventory
    from hilq.quant import evalset

    from hilq.measurement import Protocol

    ev = evalset.write(out, arrays, model, data_name)
    device = inventory.open_device(o.device, inventory.load(o.inventory))
    protocol = Protocol(warmup_iters=1, warmup_s=0.0, min_iters=1, min_duration_s=0.0,
                        idle_s=0.0,   # timing is not the point: one pass, then the eval set
                        runtime_options=dict(o.runtime_options))
    try:
        return device.run(dbg, protocol, o.runtime, evalset=ev), ev
    finally:
        device.close()


def debug(o: DebugOptions, out: Path) -> tuple[dict, int]:
    """Per-layer error of `o`'s artifact, float vs quantized, on the engine and in
    simulation, working in `out`: (result, exit code: 1 when the engine run failed)."""
    from hilq.quant import debug as qd
    from hilq.quant.debug_onnx import write_debug_artifact
    from hilq.quant.models import load_model

    art, ref = _artifact(o, out)
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
    sim, arrays, notes, data_name, n = side(o, art, entry, ref, taps)
    if side is _graph_side:
        from hilq.quant.graph_debug import debug_input_shapes

        dbg = debug_input_shapes(dbg, arrays)
    info = {v["layer"]: {"op": v["op"], "precision": v["precision"]}
            for v in m["layer_map"].values()}
    result = {"model": m.get("model"), "variant": m.get("variant"),
              "runtime": None if not o.engine else o.runtime,
              "device": None if not o.engine else o.device,
              "n": n, "artifact": art.path, "artifact_sha256": art.sha256,
              "debug_artifact_sha256": dbg.sha256, "status": "simulated", "notes": notes}
    code, engine, flags = 0, None, None
    if o.engine:
        meas, ev = _engine(o, dbg, arrays, out, str(m.get("model")), data_name)
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
    notes += _gap_notes(rows, o.runtime if engine is not None else None, flags)
    return result, code


def _torch_side(o: DebugOptions, art, entry, ref, taps):
    """The PyTorch route's simulation: hilq's fake-quant model rebuilt from the manifest.
    Returns (simulated rows, the debug copy's evaluation set, notes, data name, n)."""
    import torch
    from hilq.quant import debug as qd

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
    x = pool[: o.samples]
    labels = labels[: o.samples] if labels is not None else None
    with torch.no_grad():
        cap = qd.capture(res.fmodel, res.qmodel, x, [t.layer for t in taps if t.kind == "chain"])
    sim = qd.simulated(cap, taps, qd.deployed_chain(res.qmodel, x, taps))
    arrays = qd.evalset_arrays(cap, taps, m["input_name"], len(m.get("output_names") or [1]),
                               labels)
    return sim, arrays, notes, data.name, len(x)


def _graph_side(o: DebugOptions, art, entry, ref, taps):
    """The ONNX route's simulation: the graphs run by ONNX Runtime with Q/DQ as written
    (`quant.graph_debug`); same return as `_torch_side`."""
    from hilq.quant import debug as qd
    from hilq.quant import graph_debug
    from hilq.quant.onnx_feeds import load_feeds

    feeds = load_feeds(entry, ref.data, ref.preprocess, o.build.seed)
    n = min(o.samples, len(feeds))
    cap = graph_debug.capture(art, entry, feeds, n)
    sim = qd.simulated(cap, taps)
    labels = feeds.labels[:n] if feeds.labels is not None else None
    arrays = graph_debug.evalset_arrays(cap, taps, entry, feeds, n, labels)
    return sim, arrays, ["ONNX route: the simulation is the graph itself, run by ONNX Runtime "
                         "with Q/DQ executed as written"], feeds.name, n


def saturates(runtime: str | None, flags: dict | None) -> bool:
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
                   if saturates(runtime, flags) else
                   "the engine's own arithmetic (kernels, fusions, saturation)")
            out.append(f"{r['layer']}: engine {r['sqnr_db']:.2f} dB vs simulated "
                       f"{r['sqnr_db_simulated']:.2f} dB ({r['gap_db']:+.2f}), not explained "
                       f"by the exported graph's Q nodes: {why}")
    return out
