"""Per-layer error between the float and the quantized model: where accuracy is lost.

For every quantizable layer, three tensors on the same inputs:

- the float model's output of the layer (the reference) and its input;
- the fake-quant model's output of the layer (`chain`: the error it has, made here plus
  inherited from the quantized layers before it);
- the fake-quant layer applied to the *float* input (`own`: the error this layer makes on
  its own, what AIMET's QuantAnalyzer and ORT's `qdq_loss_debug` call the per-layer error).

The errors are signal-to-quantization-noise ratios in dB (10·log10 ‖ref‖² / ‖x − ref‖²) and
cosine similarities, computed by `hilq.accuracy` so the host and the device use one
formula. `inherited_db` is the part of the chain's noise the layer did not make: own and
inherited noise are assumed uncorrelated, so their powers add (None when the chain is no
noisier than the layer alone).

Given the taps of the artifact's debug copy (`quant.debug_onnx`), each simulated output is
first put through the same output QuantizeLinear the deployed graph has (and the reference
clamped at 0 behind a folded ReLU): the simulation then describes the tensor the engine
exposes, rounding included, and the two can be compared layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .debug_onnx import DEBUG_INPUT, Tap, quantize_like
from .spec import DISTILL_ITERS


@dataclass
class Capture:
    """The tensors of one pass over `x`, per layer name (graph order of the float model)."""

    x: torch.Tensor
    float_in: dict[str, np.ndarray]
    float_out: dict[str, np.ndarray]
    chain: dict[str, np.ndarray]
    own: dict[str, np.ndarray]
    logits: list[np.ndarray]             # the float model's outputs


def _outputs(out) -> list[np.ndarray]:
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.detach().float().numpy() for o in outs]


@torch.no_grad()
def capture(fmodel: nn.Module, qmodel: nn.Module, x: torch.Tensor,
            layers: list[str] | None = None) -> Capture:
    """Hook `layers` (default: the quantized model's QuantLayers) in both models and run `x`.
    Outputs are copied in the hook: an in-place ReLU after a conv would overwrite them."""
    from .transform import quant_layers

    fmodel, qmodel = fmodel.eval(), qmodel.eval()
    qmods = dict(qmodel.named_modules())
    fmods = dict(fmodel.named_modules())
    layers = [n for n in (layers or list(quant_layers(qmodel))) if n in fmods and n in qmods]
    f_in, f_out, chain, hooks = {}, {}, {}, []

    def keep(store, name, which):
        def hook(_m, inputs, output):
            t = inputs[0] if which == "in" else output
            store[name] = t.detach().clone()
        return hook

    for name in layers:
        hooks.append(fmods[name].register_forward_hook(keep(f_in, name, "in")))
        hooks.append(fmods[name].register_forward_hook(keep(f_out, name, "out")))
        hooks.append(qmods[name].register_forward_hook(keep(chain, name, "out")))
    try:
        logits = _outputs(fmodel(x))
        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    own = {name: qmods[name](f_in[name]) for name in layers if name in f_in}
    np_ = lambda d: {k: v.float().numpy() for k, v in d.items()}  # noqa: E731
    return Capture(x, np_(f_in), np_(f_out), np_(chain), np_(own), logits)


@torch.no_grad()
def deployed_chain(qmodel: nn.Module, x: torch.Tensor, taps: list[Tap]) -> dict[str, np.ndarray]:
    """The fake-quant model's layer outputs when each one also goes through its tap's output
    QuantizeLinear before the next layer reads it, as in the exported graph. The export
    quantizes tensors the fake-quant model keeps float (a conv output feeding a residual
    Add, the skip operand itself); this pass measures how much of an engine-simulation gap
    that accounts for."""
    qmods = dict(qmodel.eval().named_modules())
    chain, hooks = {}, []

    def requant(name, tap):
        def hook(_m, _inputs, output):
            y = torch.from_numpy(quantize_like(output.detach().numpy(), tap)).to(output.dtype)
            chain[name] = y.float().numpy()
            return y
        return hook

    for tap in taps:
        if tap.kind == "chain" and tap.layer in qmods:
            hooks.append(qmods[tap.layer].register_forward_hook(requant(tap.layer, tap)))
    try:
        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return chain


def reference(cap: Capture, tap: Tap | None, layer: str) -> np.ndarray:
    """The float output of `layer` as the tap exposes it: behind a folded ReLU (the tap's
    grid starts at 0), the activation's output."""
    ref = cap.float_out[layer]
    return np.maximum(ref, 0.0) if tap is not None and tap.floor == 0.0 else ref


def inherited_db(chain_db: float | None, own_db: float | None) -> float | None:
    """SQNR of the noise the layer inherits: chain noise power minus own (uncorrelated)."""
    if chain_db is None or own_db is None:
        return None
    rest = 10 ** (-chain_db / 10) - 10 ** (-own_db / 10)
    return -10 * math.log10(rest) if rest > 0 else None


def simulated(cap: Capture, taps: list[Tap] | None = None,
              deployed: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Per-layer figures of the fake-quant model, in graph order: `sqnr_db_simulated`,
    `cosine_simulated`, `own_error_db_simulated`, `inherited_db_simulated`. With `taps`,
    only the tapped layers, each read through its tap's output Q; with `deployed`
    (`deployed_chain`), `sqnr_db_deployed_sim` beside them."""
    from hilq.accuracy import cosine, sqnr_db

    by_layer = {t.layer: t for t in taps or () if t.kind == "chain"}
    layers = list(by_layer) if taps else list(cap.chain)
    rows = []
    for name in layers:
        if name not in cap.chain:
            continue
        tap = by_layer.get(name)
        ref = reference(cap, tap, name)
        chain = quantize_like(cap.chain[name], tap) if tap else cap.chain[name]
        own = quantize_like(cap.own[name], tap) if tap else cap.own[name]
        c, o = sqnr_db(ref, chain), sqnr_db(ref, own)
        rows.append({"layer": name, "sqnr_db_simulated": c, "cosine_simulated": cosine(ref, chain),
                     "own_error_db_simulated": o, "inherited_db_simulated": inherited_db(c, o)})
        if deployed is not None and name in deployed:
            rows[-1]["sqnr_db_deployed_sim"] = sqnr_db(ref, deployed[name])
    return rows


def evalset_arrays(cap: Capture, taps: list[Tap], input_name: str, n_outputs: int,
                   labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The evaluation set of the debug copy (the agent's `--eval` arrays): the inputs, each
    `own` tap's float layer input, and per output k its float reference `fp32:k` (the
    graph's own outputs first, then every tap) with `scale:k`/`zero_point:k` for an integer
    tap, which the device dequantizes before comparing."""
    out = {f"input:{input_name}": cap.x.numpy()}
    for k, ref in enumerate(cap.logits[:n_outputs]):
        out[f"fp32:{k}"] = ref
    if labels is not None:
        out["labels"] = torch.as_tensor(labels).long().numpy()
    for tap in taps:
        if tap.layer not in cap.float_out:
            continue
        if tap.kind == "own":
            out[f"input:{DEBUG_INPUT}{tap.layer}"] = cap.float_in[tap.layer]
        out[f"fp32:{tap.index}"] = reference(cap, tap, tap.layer).astype(np.float32)
        if tap.scale is not None:
            out[f"scale:{tap.index}"] = np.float32(tap.scale)
            out[f"zero_point:{tap.index}"] = np.asarray(tap.zero_point, dtype=tap.dtype)
    return out


def engine_rows(taps: list[Tap], outputs: list[dict]) -> list[dict]:
    """The device's per-output figures (`accuracy["outputs"]`) as per-layer rows:
    `sqnr_db`, `cosine`, `own_error_db`, `inherited_db`."""
    by_index = {o["index"]: o for o in outputs}
    rows: dict[str, dict] = {}
    for tap in taps:
        o = by_index.get(tap.index) or {}
        row = rows.setdefault(tap.layer, {"layer": tap.layer})
        if tap.kind == "chain":
            row.update(sqnr_db=o.get("sqnr_db"), cosine=o.get("cosine"))
        else:
            row["own_error_db"] = o.get("sqnr_db")
    for row in rows.values():
        row["inherited_db"] = inherited_db(row.get("sqnr_db"), row.get("own_error_db"))
    return list(rows.values())


FIELDS = ("layer", "sqnr_db", "sqnr_db_simulated", "cosine", "own_error_db")


def merge(sim: list[dict], engine: list[dict] | None, info: dict | None = None) -> list[dict]:
    """One row per layer (graph order kept in `index`), engine figures beside the simulated
    ones (None without an engine run), `gap_db` = engine − simulated, ordered from the worst
    layer to the best: lowest `sqnr_db`, or the simulated one when the engine gave none."""
    eng = {r["layer"]: r for r in engine or ()}
    rows = []
    for i, s in enumerate(sim):
        e = eng.get(s["layer"], {})
        row = {k: None for k in FIELDS}
        row.update(layer=s["layer"], index=i, **(info or {}).get(s["layer"], {}))
        row.update({k: e.get(k) for k in ("sqnr_db", "cosine", "own_error_db", "inherited_db")})
        row.update({k: v for k, v in s.items() if k != "layer"})
        a, b = row["sqnr_db"], row["sqnr_db_simulated"]
        row["gap_db"] = None if a is None or b is None else a - b
        rows.append(row)
    return sorted(rows, key=_worst_first)


def _worst_first(row: dict) -> tuple:
    v = row["sqnr_db"] if row["sqnr_db"] is not None else row["sqnr_db_simulated"]
    return (v is None, v if v is not None else 0.0, row["index"])


def culprits(rows: list[dict]) -> list[str]:
    """Layers by the error they make themselves, worst first (engine own error, else the
    simulated one): where the error is introduced, not where it shows."""
    def own(r):
        v = r["own_error_db"] if r["own_error_db"] is not None else r["own_error_db_simulated"]
        return (v is None, v if v is not None else 0.0, r["index"])
    return [r["layer"] for r in sorted(rows, key=own)]


def fake_quant_model(entry, manifest: dict, net: nn.Module | None = None):
    """The fake-quant model an artifact was exported from, rebuilt through the same seeded
    pipeline from its manifest (bit config, repairs, seed, calibration data): a
    `pipeline.QuantResult` (`qmodel`, and `fmodel`, the folded float model it came from)."""
    from .pipeline import QuantResult, quantize_model
    from .spec import BitConfig
    from .transform import fold_bn

    net = (net if net is not None else entry.build()).eval()
    config = BitConfig.from_dict(manifest.get("bit_config") or {})
    s = manifest.get("settings") or {}
    if not config.layers:
        f = fold_bn(net)
        return QuantResult(f, f, None, None, 0, 0, config, 0.0)
    distill = s.get("distill") or {}
    return quantize_model(entry, config, repairs=tuple(s.get("repairs") or ()),
                          seed=int(s.get("seed", 0)), model=net,
                          calib_data=s.get("calib_data", "real"),
                          distill_iters=int(distill.get("iters", DISTILL_ITERS)),
                          distill_objective=distill.get("objective", "batch"))


@torch.no_grad()
def reference_deviation(artifact, qmodel: nn.Module) -> float | None:
    """Max |rebuilt fake-quant − the artifact's reference outputs| (the reference `.npz`
    written at export holds the fake-quant model's outputs): ~0 when the rebuilt model is
    the one exported; None without a reference beside the artifact."""
    from pathlib import Path

    name = artifact.manifest.get("reference")
    path = Path(artifact.path).parent / name if name else None
    if path is None or not path.is_file():
        return None
    with np.load(path) as ref:
        x = next(ref[k] for k in ref.files if k.startswith("input:"))
        want = ref["output:0"]
    got = _outputs(qmodel.eval()(torch.from_numpy(x)))[0]
    return float(np.abs(got - want).max()) if got.shape == want.shape else math.inf
