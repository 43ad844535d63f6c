"""Per-layer sensitivity: how much quantizing one layer alone to k bits hurts the model.

Two measures, both data-free when given ZeroQ's distilled batch:

- ZeroQ's KL: quantize only layer i (weights, and its input activation when `act_bits` is
  given), and average KL(FP32 output ‖ quantized output) over the batch. Direct, but one
  forward pass per (layer, precision).
- HAWQ's Hessian measure: the average Hessian trace of the loss w.r.t. the layer's weights
  (Hutchinson's estimator, Rademacher probes) times the weight perturbation ‖W − Q_k(W)‖².
  One trace estimate per layer serves every precision. The loss is cross-entropy against the
  FP32 model's own argmax predictions, so no labels are needed.

Both run on the BN-folded model, because that is the model that gets quantized.
A precision is labelled with its variant name (`w4a8`; `w4a16` = weight-only), the same
spelling the allocator returns and `config_from_allocation` turns back into a `BitConfig`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .options import SENSITIVITY_METHODS, SensitivityOptions
from .quantizer import qparams, quant_error
from .spec import BitConfig, LayerPrecision, SpecError, act_spec, parse_variant, weight_spec
from .transform import QuantLayer, bops, fold_bn, layer_infos, quantizable_layers, size_bits

METHODS = SENSITIVITY_METHODS


def precision(w_bits: int, act_bits: int | None = None, calib: str = "minmax") -> LayerPrecision:
    """Per-channel symmetric weights, per-tensor asymmetric activations (None = float)."""
    return LayerPrecision(weight_spec(w_bits), act_spec(act_bits, calib=calib) if act_bits else None)


def _names(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    known = quantizable_layers(model)
    if layers is None:
        return known
    layers = list(layers)
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise SpecError(f"not a conv/linear layer of the model: {', '.join(unknown[:5])}")
    return layers


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _input_ranges(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict:
    """Min and max of each layer's input over `x`: what min-max calibration would see."""
    ranges, handles = {}, []
    for name in names:
        def hook(mod, inp, name=name):
            ranges[name] = (inp[0].min(), inp[0].max())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return ranges


@torch.no_grad()
def kl_sensitivity(model: nn.Module, x: torch.Tensor, bits: Sequence[int] = (2, 4, 8), *,
                   act_bits: int | None = None, layers: Iterable[str] | None = None) -> list[dict]:
    """ZeroQ's sensitivity: rows {layer, precision, sensitivity} with sensitivity =
    KL(FP32 ‖ only-this-layer-quantized) averaged over the batch `x`.

    The activation range of the quantized layer's input is min-max over `x`, as calibration
    on the same batch would set it.
    """
    fmodel = fold_bn(model)
    names = _names(fmodel, layers)
    ranges = _input_ranges(fmodel, names, x) if act_bits else {}
    ref = F.log_softmax(fmodel(x), dim=-1)
    rows = []
    for name in names:
        layer = fmodel.get_submodule(name)
        for k in bits:
            p = precision(k, act_bits)
            q = QuantLayer(layer, p.weight, p.act)
            if p.act is not None:
                q.act_scale, q.act_zp = qparams(*ranges[name], p.act)
            q.mode = "quant"
            _set_module(fmodel, name, q)
            try:
                out = F.log_softmax(fmodel(x), dim=-1)
            finally:
                _set_module(fmodel, name, layer)
            kl = F.kl_div(out, ref, log_target=True, reduction="batchmean")
            rows.append({"layer": name, "precision": p.name, "sensitivity": max(float(kl), 0.0)})
    return rows


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimates of tr(H_i)/n_i per layer, and how the estimation ended."""

    per_param: dict[str, float]
    iters: int
    converged: bool


def hessian_traces(model: nn.Module, x: torch.Tensor, *, layers: Iterable[str] | None = None,
                   max_iters: int = 200, tol: float = 1e-3, seed: int = 0,
                   blockwise: bool = True, fold: bool = True) -> TraceEstimate:
    """Average Hessian trace per weight of each layer: E[vᵀH_ii v]/n_i with Rademacher v.

    Hessian-vector products by double backward through the (BN-folded) float model; the
    loss is cross-entropy against the model's own predictions on `x`. `blockwise` probes
    each layer's diagonal block alone (one HVP per layer per probe); otherwise one probe
    over all layers at once gives every layer's estimate from a single HVP (PyHessian's
    way: also unbiased, but cross-layer terms add variance that swamps layers with small
    traces). A layer stops when its running mean changes by less than `tol` (relative) in
    one probe, or at `max_iters`. Seeded: the same seed gives the same estimate.
    """
    fmodel = fold_bn(model) if fold else model.eval()
    names = _names(fmodel, layers)
    params = [fmodel.get_submodule(n).weight for n in names]
    with torch.no_grad():
        labels = fmodel(x).argmax(dim=-1)
    g = torch.Generator().manual_seed(seed)
    total = [0.0] * len(params)
    count = [0] * len(params)
    done = [False] * len(params)
    with torch.enable_grad():
        loss = F.cross_entropy(fmodel(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(max_iters):
            live = [i for i in range(len(params)) if not done[i]]
            if not live:
                break
            vs = [torch.randint(0, 2, params[i].shape, generator=g).to(params[i].dtype) * 2 - 1
                  for i in live]
            if blockwise:
                hvs = [torch.autograd.grad(grads[i], params[i], grad_outputs=v,
                                           retain_graph=True)[0] for i, v in zip(live, vs)]
            else:
                hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                          grad_outputs=vs, retain_graph=True)
            for i, h, v in zip(live, hvs, vs):
                prev = total[i] / count[i] if count[i] else None
                total[i] += float((h * v).sum())
                count[i] += 1
                mean = total[i] / count[i]
                done[i] = prev is not None and abs(mean - prev) <= tol * abs(mean)
    return TraceEstimate({n: t / c / p.numel() for n, t, c, p in zip(names, total, count, params)},
                         max(count, default=0), all(done))


def hessian_sensitivity(model: nn.Module, x: torch.Tensor, bits: Sequence[int] = (2, 4, 8), *,
                        act_bits: int | None = None, layers: Iterable[str] | None = None,
                        max_iters: int = 200, tol: float = 1e-3, seed: int = 0,
                        blockwise: bool = True) -> list[dict]:
    """HAWQ's sensitivity: rows {layer, precision, sensitivity} with sensitivity =
    tr(H)/n × ‖W − Q_k(W)‖² (per-channel symmetric Q_k, min-max ranges).

    It measures weights only; `act_bits` just labels the rows (`w4a8`), for an allocation
    whose activations are fixed at that precision. A negative trace estimate (a non-convex
    direction, or noise) is clamped to 0: the measure ranks, it does not reward.
    """
    fmodel = fold_bn(model)
    est = hessian_traces(fmodel, x, layers=layers, max_iters=max_iters, tol=tol, seed=seed,
                         blockwise=blockwise, fold=False)
    rows = []
    for name, trace in est.per_param.items():
        w = fmodel.get_submodule(name).weight.detach()
        for k in bits:
            p = precision(k, act_bits)
            err = quant_error(w, p.weight)
            rows.append({"layer": name, "precision": p.name,
                         "sensitivity": max(trace, 0.0) * err})
    return rows


def sensitivity_table(model: nn.Module, x: torch.Tensor, bits: Sequence[int] = (2, 4, 8), *,
                      method: str = "kl", act_bits: int | None = None,
                      layers: Iterable[str] | None = None, **kw):
    """The allocator's cost table as a DataFrame: `layer, precision, sensitivity, size_bits,
    bops` (size and BOPs of that layer alone at that precision, from `transform.layer_infos`
    on the folded model, biases at 32 bits). Feed it to `quant.allocate.CostTable.from_frame`,
    then the allocation to `config_from_allocation`."""
    import pandas as pd

    if method == "kl":
        rows = kl_sensitivity(model, x, bits, act_bits=act_bits, layers=layers, **kw)
    elif method == "hessian":
        rows = hessian_sensitivity(model, x, bits, act_bits=act_bits, layers=layers, **kw)
    else:
        raise SpecError(f"unknown sensitivity method {method!r} (use {', '.join(METHODS)})")
    infos = layer_infos(fold_bn(model), tuple(x.shape[1:]))
    for row in rows:
        one = {row["layer"]: infos[row["layer"]]}
        cfg = BitConfig({row["layer"]: precision_of(row["precision"])})
        row["size_bits"] = size_bits(one, cfg)
        row["bops"] = bops(one, cfg)
    return pd.DataFrame(rows, columns=["layer", "precision", "sensitivity", "size_bits", "bops"])


def precision_of(label: str, act_bits: int | None = None, calib: str = "minmax") -> LayerPrecision:
    """A per-layer precision label (`w8a8`, `w4a16`, `fp32`) as a `LayerPrecision`."""
    v = parse_variant(label)
    if v.config_path:
        raise SpecError(f"precision {label!r}: a per-layer precision cannot be a config file")
    if v.is_float:
        return LayerPrecision()
    return precision(v.w_bits, act_bits if act_bits is not None else v.a_bits, calib)


def config_from_allocation(model: nn.Module, allocation, *, act_bits: int | None = None,
                           calib: str = "minmax") -> BitConfig:
    """The `BitConfig` for an allocation {layer: precision label} (or an `Allocation`).

    Labels are variant names: `w4a8` → 4-bit per-channel weights and 8-bit per-tensor
    activations, `w4a16` → weight-only, `fp32` → float. `act_bits` overrides the activation
    bits of every layer (e.g. weight-only sensitivity, deployed at A8).
    """
    config: Mapping[str, str] = getattr(allocation, "config", allocation)
    known = set(quantizable_layers(model))
    unknown = sorted(set(config) - known)
    if unknown:
        raise SpecError(f"allocation names layer(s) not in the model: {', '.join(unknown[:5])}")
    return BitConfig({name: precision_of(label, act_bits, calib) for name, label in config.items()})


@dataclass
class Sensitivity:
    """A model's per-layer sensitivity table (`sensitivity_table`'s columns) and how it was
    taken; `to_dict` is what `hilq sensitivity --json` writes."""

    model: str
    options: SensitivityOptions
    table: object                        # pandas DataFrame
    samples: int
    seconds: dict

    def to_dict(self) -> dict:
        o = self.options
        return {"method": o.method, "model": self.model, "calib_data": o.calib_data,
                "samples": self.samples, "bits": list(o.bits), "act_bits": o.act_bits,
                "seconds": self.seconds, "table": self.table.to_dict("records")}


def sensitivity(model, options: SensitivityOptions | None = None,
                progress=None) -> Sensitivity:
    """The sensitivity verb: `model` (anything the model door takes) measured as `options`
    say. `progress(i, n, loss)` follows the distillation, the slow part."""
    import time

    from .models import load_model
    from .zeroq import calibration_data, input_prior

    o = options or SensitivityOptions()
    entry = load_model(model)
    net = entry.build().eval()
    real = entry.data().calib_x if o.calib_data == "real" else None
    kw = {}
    if o.calib_data == "distilled":
        kw = {"iters": o.distill_iters, "lr": o.lr, "objective": o.distill_objective,
              **input_prior(entry.preprocess), **({"progress": progress} if progress else {})}
        kw.update({k: v for k, v in (("input_mean", o.input_mean),
                                     ("input_std", o.input_std)) if v is not None})
    t0 = time.perf_counter()
    x = calibration_data(o.calib_data, net, real=real[: o.samples] if real is not None else None,
                         n=o.samples, input_shape=entry.input_shape, seed=o.seed,
                         name=entry.name, **kw)
    t1 = time.perf_counter()
    extra = ({"max_iters": o.hessian_iters, "tol": o.tol, "seed": o.seed}
             if o.method == "hessian" else {})
    df = sensitivity_table(net, x, o.bits, method=o.method, act_bits=o.act_bits, **extra)
    return Sensitivity(entry.name, o, df, len(x),
                       {"data": t1 - t0, "sensitivity": time.perf_counter() - t1})
