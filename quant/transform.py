"""Model transforms: fold BatchNorm, give each conv/linear layer its precision, calibrate.

`quantize(model, bit_config, calib)` is the one verb (torchao's `quantize_` shape): it
returns a copy of the model in which every layer named in the `BitConfig` is a `QuantLayer`
that fake-quantizes its weight and its input activation; layers not named stay float.
The same wrapped model is what PTQ repairs adjust, what QAT fine-tunes and what export reads
(scales and zero-points live on the wrappers).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import SCALE_BITS  # float32 scales, as the exported files store them
from .observers import make_observer
from .quantizer import fake_quant, minmax, qparams
from .spec import BitConfig, QuantSpec

QUANTIZABLE = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------- BatchNorm folding

def _fold_into(layer: nn.Module, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    """w' = w·γ/σ, b' = (b − μ)·γ/σ + β, per output channel."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        layer.weight.mul_(factor.reshape(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        layer.bias = nn.Parameter(new_bias.detach().clone())


def layer_graph(model: nn.Module):
    """The model's torch.fx graph with every conv/linear a `call_module` node, subclasses
    included: fx's default tracer steps inside modules defined outside torch.nn (EfficientNet's
    `Conv2dStaticSamePadding`), which would hide the layer from every pass that looks for it."""
    import torch.fx as fx

    class LayerTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (isinstance(m, QUANTIZABLE) or _opaque(m)
                    or super().is_leaf_module(m, qualname))

    return LayerTracer().trace(model)


def _opaque(m: nn.Module) -> bool:
    """An onnx2torch op holding no layer: a leaf, not traced into. Its forward branches on
    tensor values (Reshape checks its shape for zeros), which fx cannot trace, and it has
    nothing inside for a layer pass to find (the ONNX door's search failed on any file with
    a Reshape)."""
    return type(m).__module__.startswith("onnx2torch") and not any(
        isinstance(c, QUANTIZABLE) for c in m.modules())


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with each BatchNorm folded into the conv/linear that
    feeds it alone; the BatchNorm becomes Identity. Found on the torch.fx graph, so it works
    for any traceable model, not only nn.Sequential chains."""
    import torch.fx as fx

    model = copy.deepcopy(model).eval()
    try:
        graph = layer_graph(model)
    except Exception:  # noqa: BLE001 — untraceable models fold only Sequential pairs
        return _fold_sequential(model)
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target),
                                                      (nn.BatchNorm2d, nn.BatchNorm1d)):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), QUANTIZABLE)):
            _fold_into(modules[src.target], modules[node.target])
            _set_module(model, node.target, nn.Identity())
    return model


def _fold_sequential(model: nn.Module) -> nn.Module:
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, a), (bname, b) in zip(children, children[1:]):
            if isinstance(a, QUANTIZABLE) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm1d)):
                _fold_into(a, b)
                setattr(parent, bname, nn.Identity())
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------- quantized layers

def _weight_view_spec(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantSpec]:
    """Weights quantize per output channel on axis 0; groups run along the flattened input
    (reduction) axis, as INT4 block quantization does."""
    if spec.granularity == "group":
        return w.reshape(w.shape[0], -1), spec.with_(axis=1)
    return w, spec.with_(axis=0)


_PLAIN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward)


def layer_forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with weight `w` in place of its own. A subclass with its own forward
    (EfficientNet's static "same" padding before the conv, say) runs that forward."""
    if type(layer).forward not in _PLAIN_FORWARDS:
        return torch.func.functional_call(layer, {"weight": w}, (x,), strict=False)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


class QuantLayer(nn.Module):
    """A conv/linear layer with fake-quantized weight and input activation.

    `mode` is `observe` during calibration (activations pass through float while the observer
    watches them), then `quant`. Weight qparams are computed from the weight itself (min-max)
    unless a repair (AdaRound, MSE search) set them; `weight_override` holds a repaired,
    already-quantized weight when a repair chose the rounding itself.
    """

    def __init__(self, layer: nn.Module, weight: QuantSpec | None, act: QuantSpec | None):
        super().__init__()
        self.layer, self.weight_spec, self.act_spec = layer, weight, act
        self.mode = "observe"
        self.observer = make_observer(act) if act is not None and not act.dynamic else None
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zp", None)
        self.register_buffer("w_scale", None)
        self.register_buffer("w_zp", None)
        self.weight_override: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(0)
        if weight is not None:
            self.reset_weight_qparams()

    def reset_weight_qparams(self) -> None:
        w, spec = _weight_view_spec(self.layer.weight.detach(), self.weight_spec)
        self.w_scale, self.w_zp = qparams(*minmax(w, spec), spec)

    def quant_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if self.weight_spec is None:
            return w
        if self.weight_override is not None:
            return self.weight_override
        wv, spec = _weight_view_spec(w, self.weight_spec)
        return fake_quant(wv, self.w_scale, self.w_zp, spec, self.generator).reshape(w.shape)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_spec
        if spec is None:
            return x
        if spec.dynamic:
            scale, zp = qparams(*minmax(x, spec), spec)
            return fake_quant(x, scale, zp, spec)
        if self.mode == "observe":
            self.observer.update(x.detach())
            return x
        return fake_quant(x, self.act_scale, self.act_zp, spec)

    def freeze(self) -> None:
        """End calibration: fix the activation qparams from what the observer saw."""
        if self.observer is not None:
            self.act_scale, self.act_zp = self.observer.qparams()
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_forward(self.layer, self.quant_input(x), self.quant_weight())

    def extra_repr(self) -> str:
        w = f"w{self.weight_spec.bits}" if self.weight_spec else "wfp"
        a = f"a{self.act_spec.bits}" if self.act_spec else "afp"
        return f"{w}{a}, mode={self.mode}"


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers a `BitConfig` may name (before wrapping)."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def prepare(model: nn.Module, config: BitConfig, *, fold: bool = True) -> nn.Module:
    """A copy of `model` (BN folded) with the layers named in `config` wrapped, observing."""
    model = fold_bn(model) if fold else copy.deepcopy(model).eval()
    known = set(quantizable_layers(model))
    unknown = sorted(set(config.layers) - known)
    if unknown:
        raise ValueError(f"bit config names layer(s) not in the model: {', '.join(unknown[:5])}")
    for name, p in config.layers.items():
        if p.weight is None and p.act is None:
            continue
        try:
            wrapped = QuantLayer(model.get_submodule(name), p.weight, p.act)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        _set_module(model, name, wrapped)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Run calibration batches through the observing model, then freeze every layer."""
    model.eval()
    layers = quant_layers(model)
    for layer in layers.values():
        layer.mode = "observe"
    seen = 0
    for x in batches:
        model(x)
        seen += 1
    if seen == 0 and any(q.observer is not None for q in layers.values()):
        raise ValueError("calibration needs at least one batch of data")
    for layer in layers.values():
        layer.freeze()
    return model


def batches(x: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def quantize(model: nn.Module, config: BitConfig, calib: torch.Tensor | Iterable[torch.Tensor] | None,
             *, fold: bool = True) -> nn.Module:
    """The one verb: fold BN, wrap the layers `config` names, calibrate, freeze."""
    qmodel = prepare(model, config, fold=fold)
    if isinstance(calib, torch.Tensor):
        calib = batches(calib)
    return calibrate(qmodel, calib or [])


# ---------------------------------------------------------------- size and BOPs

@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer's facts: what size and BOPs accounting need."""

    name: str
    kind: str          # conv | linear
    params: int        # weight elements
    bias: int          # bias elements (kept in 32 bits)
    macs: int          # multiply-accumulates per sample
    shape: tuple[int, ...] = ()   # weight shape: how many scales a granularity needs


@torch.no_grad()
def layer_infos(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerInfo]:
    """Per-layer weight counts and MACs per sample, from one forward pass with hooks."""
    model = copy.deepcopy(model).eval()
    infos: dict[str, LayerInfo] = {}
    hooks = []
    for name, m in model.named_modules():
        layer = m.layer if isinstance(m, QuantLayer) else m
        if not isinstance(layer, QUANTIZABLE) or any(name.startswith(n + ".") for n in infos):
            continue

        def hook(mod, inp, out, name=name, layer=layer):
            per_out = layer.weight[0].numel()
            outputs = out[0].numel() if out.dim() > 1 else out.numel()
            kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
            infos[name] = LayerInfo(name, kind, layer.weight.numel(),
                                    layer.bias.numel() if layer.bias is not None else 0,
                                    per_out * outputs, tuple(layer.weight.shape))
        hooks.append(m.register_forward_hook(hook))
    try:
        model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return infos


def qparam_count(info: LayerInfo, spec) -> int:
    """How many (scale, zero-point) pairs a weight spec stores for this layer: one, one per
    output channel, or one per group of the flattened reduction axis (`_weight_view_spec`)."""
    if spec.granularity == "tensor" or not info.shape:
        return 1
    out = info.shape[0]
    if spec.granularity == "channel":
        return out
    return out * -(-(info.params // out) // spec.group_size)


def size_bits(infos: dict[str, LayerInfo], config: BitConfig, float_bits: int = 32) -> int:
    """Weight storage in bits, as a deployment stores it: quantized weights at their
    precision, plus a 32-bit scale per tensor/channel/group and, for asymmetric grids, a
    zero-point at the weight precision (group-wise INT4 with group 32 pays 1 bit per weight
    for its scales: not negligible); biases 32 bits."""
    total = 0
    for name, info in infos.items():
        spec = config.get(name).weight
        total += info.bias * 32
        if spec is None:
            total += info.params * float_bits
            continue
        qparams = qparam_count(info, spec)
        total += info.params * spec.bits + qparams * (
            SCALE_BITS + (0 if spec.symmetric else spec.bits))
    return total


def bops(infos: dict[str, LayerInfo], config: BitConfig, float_bits: int = 32) -> int:
    """Bit operations per sample: MACs × weight bits × activation bits (HAWQ-V3's measure)."""
    total = 0
    for name, info in infos.items():
        p = config.get(name)
        total += info.macs * (p.w_bits or float_bits) * (p.a_bits or float_bits)
    return total
