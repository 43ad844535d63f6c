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
from .spec import BitConfig, SpecError

COMPUTE = ("Conv", "Gemm", "MatMul")
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

    @property
    def macs_per_output(self) -> int:
        return int(np.prod(self.weight.shape[1:]))


def normalise(path: str, out_dir: str | None = None):
    """The file after ONNX Runtime's basic offline optimisation, shape-inferred, every node
    named (a ModelProto)."""
    import onnx
    import onnxruntime as ort

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


def _observe(proto, qlayers: dict, found: dict[str, Layer], inputs, feeds: dict,
             fixed: dict) -> None:
    """Run the float graph on the calibration feeds and show each layer's input tensor to
    that layer's observer; then freeze every layer."""
    import onnx

    wanted = sorted({found[n].input for n, q in qlayers.items() if q.observer is not None})
    if wanted:
        m = copy.deepcopy(proto)
        outs = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in outs)
        sess = session(m)
        for feed in chunks(feeds, fixed, chunk_size(inputs, feeds, fixed)):
            values = dict(zip(wanted, sess.run(wanted, feed)))
            for name, q in qlayers.items():
                if q.observer is not None:
                    q.observer.update(torch.from_numpy(np.asarray(values[found[name].input],
                                                                  np.float32)))
    for q in qlayers.values():
        q.freeze()


def _ranges(proto, inputs, feeds: dict, fixed: dict):
    """Min-max of the float graph's tensors on the calibration feeds (the tensors hilq's
    layers do not quantize themselves: adds, pools), as `insert_qdq` asks for them."""
    import onnx

    def ranges(tensors: list[str]) -> dict[str, tuple[float, float]]:
        m = copy.deepcopy(proto)
        del m.graph.output[:]
        m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT,
                                                                 None) for t in tensors)
        sess = session(m)
        lo = {t: np.inf for t in tensors}
        hi = {t: -np.inf for t in tensors}
        for feed in chunks(feeds, fixed, chunk_size(inputs, feeds, fixed)):
            for t, v in zip(tensors, sess.run(tensors, feed)):
                lo[t], hi[t] = min(lo[t], float(np.min(v))), max(hi[t], float(np.max(v)))
        return {t: (lo[t], hi[t]) for t in tensors}
    return ranges


def quantize(proto, config: BitConfig, inputs, feeds: dict, fixed: dict, *,
             act_dtype: str = "uint8", placement: str = "ort"):
    """`proto` (normalised) with the layers `config` names quantized and Q/DQ inserted, and
    the export facts for the manifest. `feeds`/`fixed`: calibration inputs by name."""
    from .export import insert_qdq
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
    _observe(proto, qlayers, found, inputs, feeds, fixed)
    proto = copy.deepcopy(proto)
    info = insert_qdq(proto, None, qlayers, act_dtype=act_dtype, placement=placement,
                      layer_of={n: n for n in found}, ranges_of=_ranges(proto, inputs, feeds,
                                                                         fixed))
    return proto, info
