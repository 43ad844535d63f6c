"""The ONNX route: quantize a file on its own graph, for files PyTorch cannot take.

onnx2torch converts what `torch.onnx.export` writes; files from other exporters often do
not convert (Paddle2ONNX keeps weights in `Constant` nodes, several inputs, control flow).
For those, hilq quantizes the graph itself, with the same rules as the PyTorch route:

1. normalise with ONNX Runtime's offline basic optimisation (what its own
   `quant_pre_process` runs): `Constant` nodes become initializers, constants fold,
   BatchNorm folds into the convolution before it; then ONNX shape inference;
2. every Conv/Gemm/MatMul whose weight is an initializer is a layer, named by its node,
   so a `BitConfig` (and with it the search, sensitivity and `config:` variants) names
   layers here exactly as on the PyTorch route;
3. calibrate: run the float graph on the calibration feeds and show each layer's input to
   the layer's own hilq observer (min-max, percentile, MSE, entropy);
4. insert Q/DQ with `quant.export.insert_qdq`, the one set of placement rules.

Weights are held in `QuantLayer`s around a bare module that carries the weight in PyTorch's
layout, so weight quantization (per-channel, groups, codebooks' grids) is hilq's own too.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .onnx_run import chunk_size, chunks, session
from .qdq import COMPUTE
from .spec import BitConfig, SpecError

MIN_OPSET = 13


class GraphRouteError(SpecError):
    """A file the ONNX route cannot quantize (the message names the node and op)."""


class _Weight(nn.Module):
    """A layer's weight in PyTorch's layout ([out, in, ...] for Conv, [N, K] for a linear),
    all a `QuantLayer` needs to quantize it."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(np.array(weight, np.float32)),
                                   requires_grad=False)
        self.bias = None


@dataclass(frozen=True)
class Layer:
    """A quantizable node: its op, its weight in PyTorch's layout, its data input."""

    name: str
    op: str
    weight: np.ndarray
    input: str


def normalise(path: str, out_dir: str | None = None):
    """The file after ONNX Runtime's basic offline optimisation, shape-inferred, every node
    named (a ModelProto)."""
    import onnx
    import onnxruntime as ort

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="hilq-norm-", dir=out_dir)
    out = os.path.join(tmp, "normalised.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = out
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        proto = onnx.load(out)
    except Exception as e:  # noqa: BLE001 — ORT's own error, in one line
        raise GraphRouteError(f"{path}: ONNX Runtime cannot load it to normalise it: "
                              f"{str(e).splitlines()[0][:200]}") from None
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    proto = _at_least(proto, MIN_OPSET, path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 — shapes only help; a graph that defeats inference runs
        pass
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return proto


def _at_least(proto, opset: int, path):
    """The graph at `opset` or newer, converted by ONNX's own version converter: per-channel
    DequantizeLinear (its `axis`) needs opset 13, and exporters such as Paddle2ONNX write 11
    or 12."""
    import onnx

    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # noqa: BLE001 — the converter's own error, in one line
        raise GraphRouteError(f"{path}: opset {current} cannot be converted to {opset}, which "
                              f"per-channel Q/DQ needs: {str(e).splitlines()[0][:160]}") from None


def layers(proto) -> dict[str, Layer]:
    """The graph's quantizable layers by node name, in graph order."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type not in COMPUTE or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.input[0] in inits or w.dtype != np.float32:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            w = w.T                                   # x @ W = linear with weight Wᵀ
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or w.ndim != 2:
                continue
            w = w if attrs.get("transB", 0) else w.T
        elif w.ndim < 3:
            continue
        out[node.name] = Layer(node.name, node.op_type, w, node.input[0])
    return out


def calibrated(proto, config: BitConfig, inputs, feeds: dict, fixed: dict) -> dict:
    """The layers `config` names as `QuantLayer`s (layer name = node name), their activation
    observers shown each layer's input while the float graph runs on the calibration feeds,
    then frozen. Layers calibrate independently (the float graph is what runs), so a subset
    of them is what a config of that subset would give."""
    from .transform import QuantLayer

    found = layers(proto)
    unknown = sorted(set(config.layers) - set(found))
    if unknown:
        raise GraphRouteError(f"bit config names layer(s) not in the graph: "
                              f"{', '.join(unknown[:5])}")
    qlayers = {}
    for name, p in config.layers.items():
        if p.weight is None and p.act is None:
            continue
        try:
            qlayers[name] = QuantLayer(_Weight(found[name].weight), p.weight, p.act)
        except ValueError as e:
            raise GraphRouteError(f"layer {name} ({found[name].op}): {e}") from None
    if not feeds and any(q.observer is not None for q in qlayers.values()):
        raise GraphRouteError("the ONNX route calibrates activations on real inputs: give "
                              "--data (data-free calibration needs the PyTorch route)")
    wanted = sorted({found[n].input for n, q in qlayers.items() if q.observer is not None})
    if wanted:
        sess = session(with_outputs(proto, wanted, keep=True))
        for feed in chunks(feeds, fixed, chunk_size(inputs, feeds, fixed)):
            values = dict(zip(wanted, sess.run(wanted, feed)))
            for name, q in qlayers.items():
                if q.observer is not None:
                    q.observer.update(torch.from_numpy(np.asarray(values[found[name].input],
                                                                  np.float32)))
    for q in qlayers.values():
        q.freeze()
    return qlayers


def with_outputs(proto, tensors: list[str], keep: bool):
    """A copy of the graph whose outputs are `tensors` (after its own, with `keep`)."""
    import onnx

    m = copy.deepcopy(proto)
    have = {o.name for o in m.graph.output} if keep else set()
    if not keep:
        del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for t in tensors if t not in have)
    return m


class Ranges:
    """Min-max of the float graph's tensors on the calibration feeds, for the tensors hilq's
    layers do not quantize themselves (adds, pools), as `insert_qdq` asks for them; each
    tensor is computed once however many configurations ask."""

    def __init__(self, proto, inputs, feeds: dict, fixed: dict):
        self.proto, self.inputs, self.feeds, self.fixed = proto, inputs, feeds, fixed
        self.known: dict[str, tuple[float, float]] = {}

    def __call__(self, tensors: list[str]) -> dict[str, tuple[float, float]]:
        todo = [t for t in tensors if t not in self.known]
        if todo:
            sess = session(with_outputs(self.proto, todo, keep=False))
            lo = dict.fromkeys(todo, np.inf)
            hi = dict.fromkeys(todo, -np.inf)
            for feed in chunks(self.feeds, self.fixed,
                               chunk_size(self.inputs, self.feeds, self.fixed)):
                for t, v in zip(todo, sess.run(todo, feed)):
                    lo[t], hi[t] = min(lo[t], float(np.min(v))), max(hi[t], float(np.max(v)))
            self.known.update({t: (lo[t], hi[t]) for t in todo})
        return {t: self.known[t] for t in tensors}


def with_qdq(proto, qlayers: dict, ranges: Ranges, *, act_dtype: str = "uint8",
             placement: str = "ort"):
    """A copy of `proto` with `qlayers` (calibrated) written as Q/DQ by hilq's export rules,
    and the export facts."""
    from .qdq import insert_qdq

    proto = copy.deepcopy(proto)
    info = insert_qdq(proto, qlayers, act_dtype=act_dtype, placement=placement,
                      layer_of={n: n for n in layers(proto)}, ranges_of=ranges)
    return proto, info


REPAIRS = ("bias",)


def quantize(proto, config: BitConfig, inputs, feeds: dict, fixed: dict, *,
             act_dtype: str = "uint8", placement: str = "ort", repairs=(),
             progress=lambda s: None):
    """`proto` (normalised) with the layers `config` names quantized and Q/DQ inserted, and
    the export facts for the manifest. `feeds`/`fixed`: calibration inputs by name;
    `repairs`: `bias` (empirical bias correction, as the PyTorch route's repair)."""
    unknown = sorted(set(repairs) - set(REPAIRS))
    if unknown:
        raise GraphRouteError(f"repair {unknown[0]!r}: the ONNX route has "
                              f"{', '.join(REPAIRS)} (CLE, AdaRound and the rest need the "
                              "PyTorch route)")
    qlayers = calibrated(proto, config, inputs, feeds, fixed)
    ranges = Ranges(proto, inputs, feeds, fixed)
    if "bias" in repairs:
        proto = bias_corrected(proto, qlayers, ranges, inputs, feeds, fixed,
                               act_dtype=act_dtype, placement=placement, progress=progress)
    return with_qdq(proto, qlayers, ranges, act_dtype=act_dtype, placement=placement)


def _channel_mean(x: np.ndarray, op: str) -> np.ndarray:
    """Per-output-channel mean: axis 1 of a convolution's NC..., the last of a linear's."""
    x = np.asarray(x, np.float64)
    axis = 1 if op == "Conv" else x.ndim - 1
    return x.mean(axis=tuple(a for a in range(x.ndim) if a != axis))


def bias_corrected(proto, qlayers: dict, ranges: Ranges, inputs, feeds: dict, fixed: dict, *,
                   act_dtype: str = "uint8", placement: str = "ort", progress=lambda s: None):
    """Empirical bias correction on the graph (Nagel et al., 2019; `quant.repairs`'s
    `bias_correction` on the PyTorch route): layer by layer in graph order, the mean of each
    output channel in the quantized graph (earlier layers already corrected) against the
    float graph's, the difference taken off the layer's bias. A copy of `proto`."""
    from onnx import numpy_helper

    from .onnx_run import run

    proto = copy.deepcopy(proto)
    found = layers(proto)
    nodes = {n.name: n for n in proto.graph.node if n.name in qlayers}
    ys = [nodes[n].output[0] for n in nodes]
    ref = dict(zip(ys, run(session(with_outputs(proto, ys, keep=False)), inputs, feeds, fixed)))
    inits = {i.name: i for i in proto.graph.initializer}
    for i, (name, node) in enumerate(nodes.items()):
        progress(f"bias correction {i + 1}/{len(nodes)}: {name}")
        q, _ = with_qdq(proto, qlayers, ranges, act_dtype=act_dtype, placement=placement)
        y = next(n.output[0] for n in q.graph.node if n.name == name)
        got = run(session(with_outputs(q, [y], keep=False)), inputs, feeds, fixed)[0]
        shift = _channel_mean(got, found[name].op) - _channel_mean(ref[node.output[0]],
                                                                   found[name].op)
        if len(node.input) > 2 and node.input[2] in inits:
            b = inits[node.input[2]]
            bias = numpy_helper.to_array(b).astype(np.float64)
            new = (bias.reshape(-1) - shift).reshape(bias.shape).astype(np.float32)
            b.CopyFrom(numpy_helper.from_array(new, b.name))
        elif len(node.input) < 3 and node.op_type in ("Conv", "Gemm"):
            b = numpy_helper.from_array((-shift).astype(np.float32), f"{name}_bias_corrected")
            proto.graph.initializer.append(b)
            inits[b.name] = b
            node.input.append(b.name)
    return proto


def edges(proto, names) -> list[tuple[str, str]]:
    """(producer, consumer) pairs of layers joined by a tensor path through other ops only:
    where a Q/DQ pair sits between two INT8 layers (the search's boundary costs), as
    `bench.search.float_edges` finds them on a PyTorch graph."""
    wanted = set(names)
    producers: dict[str, set[str]] = {}
    out = []
    for node in proto.graph.node:
        ins = {p for t in node.input for p in producers.get(t, ())}
        if node.name in wanted:
            out += [(p, node.name) for p in sorted(producers.get(node.input[0], ()))]
            ins = {node.name}
        for t in node.output:
            producers[t] = ins
    return out


def size_bits(layer: Layer, bits: int | None) -> int:
    """A layer's weights stored at `bits` (None: float), with a 32-bit scale and a zero point
    per output channel when integer (the PyTorch route's accounting)."""
    n, channels = layer.weight.size, layer.weight.shape[0]
    return n * 32 if bits is None else n * bits + channels * (32 + bits)


def sensitivity(proto, inputs, feeds: dict, fixed: dict, *, act_dtype: str = "uint8",
                progress=lambda s: None) -> dict[str, float]:
    """Each layer's sensitivity to W8A8, measured on the graph: that layer alone quantized
    (Q/DQ as deployed), the simulation run on the calibration feeds, and its outputs
    compared with the float graph's: mean KL where the model outputs class scores (ZeroQ's
    measure), else the noise-to-signal ratio summed over outputs (1/SQNR)."""
    from hilq.accuracy import SCORES, output_kind

    from .onnx_run import run
    from .spec import parse_variant, variant_config

    found = layers(proto)
    qlayers = calibrated(proto, variant_config(parse_variant("w8a8"), list(found)), inputs,
                         feeds, fixed)
    ranges = Ranges(proto, inputs, feeds, fixed)
    ref = run(session(proto), inputs, feeds, fixed)
    kinds = [output_kind(o) for o in ref]
    out = {}
    for i, name in enumerate(found):
        progress(f"sensitivity {i + 1}/{len(found)}: {name}")
        one, _ = with_qdq(proto, {name: qlayers[name]}, ranges, act_dtype=act_dtype)
        got = run(session(one), inputs, feeds, fixed)
        out[name] = _divergence(ref, got, kinds, SCORES)
    return out


def _divergence(ref: list, got: list, kinds: list[str], scores) -> float:
    from hilq.accuracy import kl_per_sample

    for r, g, kind in zip(ref, got, kinds):
        if kind in scores:
            return float(kl_per_sample(r.reshape(len(r), -1), g.reshape(len(g), -1),
                                       kind).mean())
    num = sum(float(((g.astype(np.float64) - r) ** 2).sum()) for r, g in zip(ref, got))
    den = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    return num / den if den else 0.0


@dataclass
class GraphModel:
    """An ONNX file on the ONNX route, as the search sees a model: its layers (nodes), the
    edges between them, its calibration feeds, and per-layer configs, sizes and
    sensitivities, all on the normalised graph."""

    proto: object
    layers: dict[str, Layer]
    inputs: tuple
    feeds: object               # quant.onnx_feeds.Feeds

    @classmethod
    def of(cls, entry, feeds) -> GraphModel:
        proto = normalise(entry.onnx_path)
        found = layers(proto)
        if not found:
            raise GraphRouteError(f"{entry.onnx_path}: no Conv, Gemm or MatMul with constant "
                                  "weights to quantize (fp32 still benchmarks)")
        return cls(proto, found, entry.inputs, feeds)

    def edges(self) -> list[tuple[str, str]]:
        return edges(self.proto, list(self.layers))

    def bit_config(self, allocation: dict[str, str]) -> BitConfig:
        """{layer: precision label} (float ones left out) -> the `BitConfig`, activations
        at 8 bits as the search deploys them."""
        from .sensitivity import precision_of

        unknown = sorted(set(allocation) - set(self.layers))
        if unknown:
            raise GraphRouteError(f"allocation names layer(s) not in the graph: "
                                  f"{', '.join(unknown[:5])}")
        return BitConfig({n: precision_of(label, 8) for n, label in allocation.items()})

    def size_bits(self, layer: str, bits: int | None) -> int:
        return size_bits(self.layers[layer], bits)

    def sensitivity(self, progress=lambda s: None) -> dict[str, float]:
        return sensitivity(self.proto, self.inputs, self.feeds.all_calib(), self.feeds.fixed,
                           progress=progress)
