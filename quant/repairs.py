"""Post-training repairs: make a quantized model closer to its float original without training.

- `equalize`: cross-layer equalization (Nagel et al. 2019, DFQ) — rescale channels between
  two layers joined by ReLU so both weights have similar per-channel ranges; exact in float.
- `split_outliers`: outlier channel splitting (Zhao et al. 2019) — duplicate an input channel
  holding large weights and halve it, shrinking the range to quantize; exact in float.
- `bias_correction`: empirical bias correction — remove the mean output shift quantization
  puts on each layer (measured on calibration data), layer by layer.
- `adaround`: AdaRound (Nagel et al. 2020) — learn, per layer, whether each weight rounds up
  or down, to reconstruct the float layer's output from the quantized model's inputs.

The first two act on a float model and return a copy (run them before `transform.quantize`);
the last two adjust a quantized model in place (run them after calibration).
Chains are found on the torch.fx graph, as `transform.fold_bn` does; on an untraceable model
the float repairs find no chains and return it BN-folded but otherwise unchanged.
`bias_correction` and `adaround` hold the calibration data's activations for one layer at a
time in memory: pass a few hundred samples, not a dataset.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .spec import QuantSpec
from .transform import (
    QUANTIZABLE,
    QuantLayer,
    _weight_view_spec,
    batches,
    fold_bn,
    layer_forward,
    layer_graph,
    quant_layers,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- chains on the fx graph

# Channel-wise ops that commute with a positive per-channel scale: f(s·x) = s·f(x), s > 0.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d,
                        nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d, torch.flatten, F.dropout}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten"}
# Elementwise ops commute with duplicating a channel, whatever their shape (ReLU6, GELU, ...).
_ELEMENTWISE_MODULES = _HOMOGENEOUS_MODULES + (nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                                               nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid)
_ELEMENTWISE_FUNCTIONS = _HOMOGENEOUS_FUNCTIONS | {F.relu6, F.gelu, F.silu, torch.sigmoid,
                                                   torch.tanh, F.hardswish, F.hardtanh}
_ELEMENTWISE_METHODS = _HOMOGENEOUS_METHODS | {"sigmoid", "tanh"}


def _is_flatten(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1
    if node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return False


def _passes(node: fx.Node, modules, elementwise: bool) -> bool:
    mods = _ELEMENTWISE_MODULES if elementwise else _HOMOGENEOUS_MODULES
    fns = _ELEMENTWISE_FUNCTIONS if elementwise else _HOMOGENEOUS_FUNCTIONS
    meths = _ELEMENTWISE_METHODS if elementwise else _HOMOGENEOUS_METHODS
    if node.op == "call_module":
        return isinstance(modules.get(node.target), mods)
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in meths


def _width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels if side == "out" else layer.in_channels
    return layer.out_features if side == "out" else layer.in_features


def layer_pairs(model: nn.Module, elementwise: bool = False) -> list[tuple[str, str]]:
    """(producer, consumer) conv/linear pairs where the consumer's only input is the
    producer's output through channel-wise ops used by nothing else, so the producer's output
    channel c is the consumer's input channel c. `elementwise=False` admits only ops that
    commute with positive scaling (ReLU, pooling, ...: what CLE needs); `True` admits any
    elementwise activation (enough for channel duplication).
    Covered: conv→conv and linear→linear (groups = 1), conv→flatten→linear when the flattened
    map is 1×1 (e.g. after global pooling). Residual adds, concatenations, grouped/depthwise
    convs and layers feeding several consumers end a chain."""
    try:
        graph = layer_graph(model)
    except Exception:  # noqa: BLE001 — untraceable: no chains, repairs are no-ops
        return []
    modules = dict(model.named_modules())

    def layer_of(node):
        if node.op == "call_module" and isinstance(modules.get(node.target), QUANTIZABLE):
            m = modules[node.target]
            return None if getattr(m, "groups", 1) != 1 else m
        return None

    pairs = []
    for node in graph.nodes:
        a = layer_of(node)
        if a is None:
            continue
        cur, flattened = node, False
        while len(cur.users) == 1:
            (nxt,) = cur.users
            if not nxt.args or nxt.args[0] is not cur or cur in nxt.args[1:]:
                break
            b = layer_of(nxt)
            if b is not None:
                same_kind = isinstance(a, nn.Conv2d) == isinstance(b, nn.Conv2d)
                ok = (same_kind and not flattened) or (
                    isinstance(a, nn.Conv2d) and isinstance(b, nn.Linear) and flattened)
                if ok and _width(a, "out") == _width(b, "in"):
                    pairs.append((node.target, nxt.target))
                break
            if not _passes(nxt, modules, elementwise):
                break
            flattened |= _is_flatten(nxt, modules)
            cur = nxt
    return pairs


def _in_view(w: torch.Tensor) -> torch.Tensor:
    """Consumer weight as (in_channels, -1)."""
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def _bshape(w: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * w.dim()
    shape[dim] = -1
    return shape


# ---------------------------------------------------------------- cross-layer equalization

@torch.no_grad()
def equalize(model: nn.Module, iters: int = 3) -> nn.Module:
    """Cross-layer equalization: for each producer→ReLU→consumer pair, scale producer output
    channel i by 1/s_i and consumer input channel i by s_i with s_i = √(r1_i·r2_i)/r2_i, so both
    per-channel ranges become √(r1_i·r2_i). ReLU(x/s) = ReLU(x)/s for s > 0, so the float
    function is unchanged; per-tensor weight quantization then wastes less of its grid.
    BatchNorm is folded first (the returned copy is BN-folded, in eval mode); `iters` sweeps
    let chains of three or more layers settle."""
    model = fold_bn(model)
    modules = dict(model.named_modules())
    pairs = layer_pairs(model)
    for _ in range(iters):
        for pa, pb in pairs:
            a, b = modules[pa], modules[pb]
            r1 = a.weight.abs().reshape(a.weight.shape[0], -1).amax(1)
            r2 = _in_view(b.weight).abs().amax(1)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp(min=1e-30), torch.ones_like(r1))
            a.weight.div_(s.reshape(_bshape(a.weight, 0)))
            if a.bias is not None:
                a.bias.div_(s)
            b.weight.mul_(s.reshape(_bshape(b.weight, 1)))
    return model


# ---------------------------------------------------------------- outlier channel splitting

def _widen(layer: nn.Module, dim: int, extra: torch.Tensor) -> None:
    """Append `extra` along `dim` of the weight (and the bias for dim 0), fixing the sizes."""
    layer.weight = nn.Parameter(torch.cat([layer.weight.detach(), extra], dim=dim))
    n = layer.weight.shape[dim]
    if isinstance(layer, nn.Conv2d):
        setattr(layer, "out_channels" if dim == 0 else "in_channels", n)
    else:
        setattr(layer, "out_features" if dim == 0 else "in_features", n)


@torch.no_grad()
def split_outliers(model: nn.Module, threshold: float = 3.0, *,
                   expand_ratio: float = 0.1) -> nn.Module:
    """Outlier channel splitting: while the consumer's largest |w| exceeds `threshold` × the
    std of its (original) weight, take the input channel holding it, halve that column and
    append a copy of it; the producer's matching output channel (weight row and bias) is
    duplicated so the new column sees the same activation. x·w = x·w/2 + x·w/2, so the float
    function is preserved (up to summation order) while max|w| shrinks.
    At most ⌈expand_ratio · in_channels⌉ channels are added per layer (OCS's expand ratio).
    Covered: every pair from `layer_pairs(..., elementwise=True)`; the first layer (whose input
    is the model input) and layers after residual adds or concatenations are not split.
    BatchNorm is folded first; returns a widened copy in eval mode."""
    model = fold_bn(model)
    modules = dict(model.named_modules())
    for pa, pb in layer_pairs(model, elementwise=True):
        a, b = modules[pa], modules[pb]
        limit = threshold * float(b.weight.std())
        budget = math.ceil(expand_ratio * _width(b, "in")) if limit > 0 else 0
        for _ in range(budget):
            col_max = _in_view(b.weight).abs().amax(1)
            c = int(col_max.argmax())
            if float(col_max[c]) <= limit:
                break
            w = b.weight.detach().clone()
            w.select(1, c).mul_(0.5)
            b.weight = nn.Parameter(w)
            _widen(b, 1, w.select(1, c).unsqueeze(1).clone())
            _widen(a, 0, a.weight.detach()[c:c + 1].clone())
            if a.bias is not None:
                a.bias = nn.Parameter(torch.cat([a.bias.detach(), a.bias.detach()[c:c + 1]]))
    return model


# ---------------------------------------------------------------- running up to one layer

class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def _run_to(model: nn.Module, module: nn.Module, x: torch.Tensor,
            grab: Callable[[tuple, torch.Tensor], None]) -> None:
    """Run `model` on `x` in batches, calling `grab(inputs, output)` at `module`, stopping there."""
    def hook(mod, args, out):
        grab(args, out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for xb in batches(x, 128):
            try:
                model(xb)
            except _Stop:
                pass
    finally:
        handle.remove()


@torch.no_grad()
def _execution_order(qmodel: nn.Module, x: torch.Tensor) -> list[str]:
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append(n) if n not in seen
                                         else None)
             for n, m in quant_layers(qmodel).items()]
    try:
        qmodel(x[:2])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _check_ready(qmodel: nn.Module, fmodel: nn.Module) -> tuple[dict, dict]:
    qlayers = quant_layers(qmodel)
    if not qlayers:
        raise ValueError("no QuantLayer in the model: quantize it first (transform.quantize)")
    for name, q in qlayers.items():
        if q.observer is not None and q.act_scale is None:
            raise ValueError(f"layer {name} is not calibrated: run transform.calibrate first")
    fmods = dict(fmodel.named_modules())
    missing = [n for n in qlayers if not isinstance(fmods.get(n), QUANTIZABLE)]
    if missing:
        raise ValueError(f"float model lacks layer(s) {', '.join(missing[:5])}: pass the "
                         "BN-folded float model the quantized one was made from")
    qmodel.eval()
    fmodel.eval()
    return qlayers, fmods


def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _channel_mean(model, module, layer, x) -> torch.Tensor:
    dim = _channel_dim(layer)
    acc = {"sum": 0.0, "n": 0}

    def grab(args, out):
        o = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim])
        acc["sum"] = acc["sum"] + o.double().sum(0)
        acc["n"] += o.shape[0]

    _run_to(model, module, x, grab)
    return (acc["sum"] / acc["n"]).float()


# ---------------------------------------------------------------- bias correction

@torch.no_grad()
def bias_correction(qmodel: nn.Module, fmodel: nn.Module, x: torch.Tensor) -> None:
    """Empirical bias correction, in place: for each QuantLayer in execution order, measure
    the per-output-channel mean of its output in the quantized model and of the same layer in
    the float model over `x`, and subtract the difference from the bias (creating one if
    absent). Layers are corrected one at a time, each measured after the earlier corrections,
    so the shift that earlier layers pass on is corrected too."""
    qlayers, fmods = _check_ready(qmodel, fmodel)
    for name in _execution_order(qmodel, x):
        q = qlayers[name]
        if q.weight_spec is None and q.act_spec is None:
            continue
        shift = _channel_mean(qmodel, q, q.layer, x) - _channel_mean(fmodel, fmods[name], q.layer, x)
        layer = q.layer
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(_width(layer, "out")))
        layer.bias.sub_(shift.to(layer.bias.dtype))


# ---------------------------------------------------------------- AdaRound

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound, eq. 23)


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _expand(t: torch.Tensor, wv: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Weight qparams broadcast to the weight view's shape."""
    if spec.granularity == "tensor" or t.dim() == 0:
        return t
    if spec.granularity == "channel":
        return t.reshape(_bshape(wv, 0))
    return t.repeat_interleave(spec.group_size, dim=1)  # (O, groups) -> (O, I)


def _collect(qmodel, q, fmodel, fmod, x) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (activation-quantized) inputs in the quantized model and its outputs in
    the float model, on the same samples."""
    ins, outs = [], []
    _run_to(qmodel, q, x, lambda args, out: ins.append(q.quant_input(args[0]).detach()))
    _run_to(fmodel, fmod, x, lambda args, out: outs.append(out.detach()))
    return torch.cat(ins), torch.cat(outs)


def adaround(qmodel: nn.Module, fmodel: nn.Module, x: torch.Tensor, iters: int = 300,
             lr: float = 1e-2, reg: float = 0.01, seed: int = 0) -> None:
    """AdaRound, layer by layer in execution order, in place.

    Weights are W = s·(clamp(⌊W/s⌋ + h(V) + z) − z) with h the rectified sigmoid, V initialised
    so that h(V) reproduces W exactly. Loss: the layer's output reconstruction error (squared
    error summed over channels, mean over samples/positions) on inputs collected from the
    *quantized* model up to this layer (so earlier layers' errors are seen and compensated),
    against the float model's output of that layer; plus `reg`·Σ(1 − |2h − 1|^β) pushing h to
    0 or 1, with β annealed 20 → 2 after a 20 % warm-up without it. Adam, mini-batches of 32
    samples. At the end h is rounded (V ≥ 0 → up) and `weight_override` is set to the hard,
    fake-quantized weight — or to nearest rounding if that reconstructs the layer better on
    `x` (it can, on layers whose inputs are nearly uncorrelated, in a few hundred steps).
    The weight qparams (`w_scale`, `w_zp`) are kept.
    Works for per-tensor, per-channel and per-group weight specs."""
    qlayers, fmods = _check_ready(qmodel, fmodel)
    gen = torch.Generator().manual_seed(seed)
    for name in _execution_order(qmodel, x):
        q = qlayers[name]
        if q.weight_spec is None:
            continue
        with torch.no_grad():
            q.weight_override = None  # start from the float weight, even if run twice
            xin, target = _collect(qmodel, q, fmodel, fmods[name], x)
        q.weight_override = _adaround_layer(q, xin, target, iters, lr, reg, gen)


def _adaround_layer(q: QuantLayer, xin: torch.Tensor, target: torch.Tensor, iters: int,
                    lr: float, reg: float, gen: torch.Generator) -> torch.Tensor:
    layer, w = q.layer, q.layer.weight.detach()
    wv, spec = _weight_view_spec(w, q.weight_spec)
    s, z = _expand(q.w_scale, wv, spec), _expand(q.w_zp, wv, spec).to(wv.dtype)
    floor = torch.floor(wv / s)
    rest = (wv / s - floor).clamp(0.0, 1.0 - 1e-6)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest
    opt = torch.optim.Adam([v], lr=lr)
    warm, dim = int(0.2 * iters), _channel_dim(layer)

    def weight(h):
        return ((torch.clamp(floor + h + z, spec.qmin, spec.qmax) - z) * s).reshape(w.shape)

    for it in range(iters):
        idx = torch.randint(len(xin), (min(32, len(xin)),), generator=gen)
        h = _rect_sigmoid(v)
        out = layer_forward(layer, xin[idx], weight(h))
        loss = ((out - target[idx]) ** 2).sum(dim).mean()
        if it >= warm:
            beta = 20.0 + (2.0 - 20.0) * (it - warm) / max(iters - warm, 1)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = weight((v >= 0).to(wv.dtype))
        nearest = weight(torch.round(wv / s) - floor)

        def err(wq):
            return sum(float(((layer_forward(layer, xb, wq) - tb) ** 2).sum())
                       for xb, tb in zip(xin.split(256), target.split(256)))

        e_hard, e_near = err(hard), err(nearest)
    log.info("adaround: reconstruction error %.4g (nearest rounding %.4g)", e_hard, e_near)
    # A few hundred noisy steps can fail to beat nearest rounding on a layer whose inputs are
    # nearly uncorrelated (nearest is then optimal): never make the layer worse.
    return (hard if e_hard <= e_near else nearest).detach()


def reconstruction_error(qlayer: QuantLayer, inputs: torch.Tensor, target: torch.Tensor,
                         weight: torch.Tensor | None = None) -> float:
    """Mean squared error of one QuantLayer's output (with its activation quantization and
    `weight`, default its quantized weight) against a float target: AdaRound's objective."""
    with torch.no_grad():
        w = qlayer.quant_weight() if weight is None else weight
        out = layer_forward(qlayer.layer, qlayer.quant_input(inputs), w)
        return float(((out - target) ** 2).mean())


__all__ = ["equalize", "split_outliers", "bias_correction", "adaround", "layer_pairs",
           "reconstruction_error"]
