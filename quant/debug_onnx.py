"""A debug copy of an exported ONNX artifact whose layers' outputs are extra graph outputs.

For `hilq debug`: the engine runs the copy over an evaluation set and returns every layer's
output, which is compared with the float model's on the host. Two taps per layer:

- `chain`: the layer's output in the deployed graph, fed by the quantized layers before it
  (the error it has, own plus inherited);
- `own`: a duplicate of the layer's unit (input Q/DQ, weight and bias DQ, the compute node,
  its output Q) reading a new graph input `debug_in:<layer>`, which the evaluation set fills
  with the float model's input of that layer: the error the layer makes on its own.

What is exposed is the QuantizeLinear output after a layer (the integer tensor), not the
float output of the Conv/Gemm. ONNX Runtime fuses DQ→Conv→Q into one QLinearConv only while
the Conv's float output has no other consumer; exposing it would leave the layer running
as DequantizeLinear + float Conv, i.e. the simulation, not the engine. The integer tensor
is the fused kernel's own output, so exposing it changes nothing that runs (the tests check
that the original outputs stay bit-identical); the host dequantizes it with the Q's scale
and zero point (`scale:<k>`, `zero_point:<k>` in the evaluation set). A layer without an
output Q (a float layer, a MatMul fused into MatMulIntegerToFloat, TensorRT placement) is
exposed as its float output, which is then what the engine computes anyway.

A folded ReLU (export folds it into the output Q, whose grid then starts at 0) makes the
exposed tensor the activation's output; `Tap.floor` = 0 says so, and the float reference of
that layer is clamped at 0 to match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact

DEBUG_INPUT = "debug_in:"     # graph inputs of the `own` taps: DEBUG_INPUT + layer
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class Tap:
    """One exposed tensor: which layer, which kind, where it is among the graph outputs and
    how to read it (scale/zero point for an integer tensor, None for a float one)."""

    layer: str
    node: str                  # the ONNX compute node (layer_map key)
    kind: str                  # "chain" | "own"
    output: str                # the graph output's name
    index: int                 # its position among the graph outputs
    scale: float | None = None
    zero_point: int | None = None
    dtype: str | None = None   # uint8 | int8 for an integer tensor
    floor: float | None = None  # lowest value the tensor can hold (0: a folded ReLU)
    input: str | None = None   # `own`: the graph input taking the layer's float input

    def to_dict(self) -> dict:
        return asdict(self)


def _init_values(graph) -> dict:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _qparams(node, inits: dict) -> tuple[float, int, str] | None:
    """A Q/DQ node's per-tensor (scale, zero point, dtype) from its initializers."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    s, z = inits[node.input[1]], inits[node.input[2]]
    if s.size != 1 or z.dtype.name not in _QRANGE:
        return None
    return float(s.reshape(())), int(z.reshape(())), z.dtype.name


def _floor(qp) -> float | None:
    s, z, dtype = qp
    return float((_QRANGE[dtype][0] - z) * s)


def _shapes(proto) -> dict:
    """Tensor name -> dims (the batch left symbolic) by ONNX shape inference; a tensor it
    cannot infer is missing (its debug input then has an unknown shape)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 — shape inference is a convenience here
        return {}
    out = {}
    for v in [*inferred.input, *inferred.value_info, *inferred.output]:   # a float last
        #                                   layer's output is the graph's, not in value_info
        if not v.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch")
                for d in v.type.tensor_type.shape.dim]
        out[v.name] = ["batch", *dims[1:]] if dims else dims
    return out


class _View:
    """The graph as the debug edit reads it: constants, shapes, who produces and consumes
    each tensor; and `expose`, which makes a tensor a graph output."""

    def __init__(self, proto):
        self.g = proto.graph
        self.inits = _init_values(self.g)
        self.shapes = _shapes(proto)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)

    def out_q(self, t: str):
        return next((c for c in self.consumers.get(t, []) if c.op_type == "QuantizeLinear"
                     and _qparams(c, self.inits)), None)

    def expose(self, name: str, elem: int, like: str) -> int:
        """The tensor's position among the graph outputs, made one if it is not (a float
        last layer's output already is: the logits)."""
        from onnx import helper

        names = [o.name for o in self.g.output]
        if name in names:
            return names.index(name)
        shape = self.shapes.get(like) or self.shapes.get(
            like.removesuffix("_QuantizeLinear_Output"))
        self.g.output.append(helper.make_tensor_value_info(name, elem, shape))
        return len(self.g.output) - 1


def debug_graph(proto, layer_map: dict, own: bool = True):
    """Edit `proto` (a loaded ONNX model, modified in place) into the debug copy; returns
    the taps in graph-output order (layers in graph order). Layers named in `layer_map` but
    absent from the graph (renamed by a later tool) are skipped."""
    from onnx import TensorProto

    view = _View(proto)
    taps: list[Tap] = []
    copies = []
    for node in [n for n in view.g.node if n.name in layer_map]:     # graph order
        layer, y = layer_map[node.name]["layer"], node.output[0]
        q = view.out_q(y)
        qp = _qparams(q, view.inits) if q is not None else None
        elem = (TensorProto.UINT8 if qp and qp[2] == "uint8" else TensorProto.INT8) if qp \
            else TensorProto.FLOAT
        tensor = q.output[0] if q is not None else y
        read = dict(scale=qp[0], zero_point=qp[1], dtype=qp[2], floor=_floor(qp)) if qp else {}
        taps.append(Tap(layer, node.name, "chain", tensor, view.expose(tensor, elem, tensor),
                        **read))
        if own:
            nodes, tensor, x_in = _own_unit(view, node, layer, q if qp else None)
            copies += nodes
            taps.append(Tap(layer, node.name, "own", tensor,
                            view.expose(tensor, elem, taps[-1].output), input=x_in, **read))
    view.g.node.extend(copies)
    return taps


def _own_unit(view: _View, node, layer: str, q) -> tuple[list, str, str]:
    """The layer's unit again, on a new graph input that will carry its float input: its
    input Q/DQ, its own copies of its weight DQs (ORT wants one per consumer), the node, and
    its output Q. Returns (nodes, the output tensor, the new input's name)."""
    from onnx import TensorProto, helper

    tag, x_in = f"debug.{layer}", f"{DEBUG_INPUT}{layer}"
    view.g.input.append(helper.make_tensor_value_info(x_in, TensorProto.FLOAT,
                                                      view.shapes.get(node.input[0])))
    nodes, src = [], x_in
    dq_in = view.producer.get(node.input[0])
    if dq_in is not None and dq_in.op_type == "DequantizeLinear" and _qparams(dq_in,
                                                                               view.inits):
        s, z = dq_in.input[1], dq_in.input[2]
        nodes += [helper.make_node("QuantizeLinear", [x_in, s, z], [f"{tag}.in_q"],
                                   name=f"{tag}.in_QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"{tag}.in_q", s, z],
                                   [f"{tag}.in"], name=f"{tag}.in_DequantizeLinear")]
        src = f"{tag}.in"
    ins = [src]
    for j, t in enumerate(node.input[1:], start=1):
        p = view.producer.get(t)
        if p is not None and p.op_type == "DequantizeLinear":
            c = helper.make_node("DequantizeLinear", list(p.input), [f"{tag}.dq{j}"],
                                 name=f"{tag}.dq{j}_DequantizeLinear")
            c.attribute.extend(p.attribute)
            nodes.append(c)
            ins.append(f"{tag}.dq{j}")
        else:
            ins.append(t)
    c = helper.make_node(node.op_type, ins, [f"{tag}.out"], name=f"{tag}.{node.op_type}",
                         domain=node.domain or None)
    c.attribute.extend(node.attribute)
    nodes.append(c)
    tensor = f"{tag}.out"
    if q is not None:
        nodes.append(helper.make_node("QuantizeLinear", [tensor, q.input[1], q.input[2]],
                                      [f"{tag}.out_q"], name=f"{tag}.out_QuantizeLinear"))
        tensor = f"{tag}.out_q"
    return nodes, tensor, x_in


def write_debug_artifact(artifact: Artifact, out_dir: str | Path, own: bool = True
                         ) -> tuple[Artifact, list[Tap]]:
    """`<out_dir>/<stem>.debug.onnx` for `artifact`, with its manifest (the original's plus
    `debug_of` and `debug_taps`); the taps say what each extra output is."""
    import onnx

    layer_map = artifact.manifest.get("layer_map") or {}
    if not layer_map:
        raise ValueError(f"artifact {artifact.path} has no layer_map: nothing to debug "
                         "(a float ONNX file as given, or an old export)")
    proto = onnx.load(artifact.path)
    taps = debug_graph(proto, layer_map, own=own)
    if not taps:
        raise ValueError(f"artifact {artifact.path}: none of its layer_map nodes is in the graph")
    onnx.checker.check_model(proto)
    out = Path(out_dir) / (Path(artifact.path).stem + ".debug.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    keep = {k: v for k, v in artifact.manifest.items()
            if k not in ("file", "sha256", "size_bytes", "reference", "eval_set",
                      "output_names")}
    art = Artifact.create(out, **keep, debug_of=artifact.sha256,
                          output_names=[o.name for o in proto.graph.output],
                          debug_taps=[t.to_dict() for t in taps])
    return art, taps


def dequantize(values: np.ndarray, tap: Tap) -> np.ndarray:
    """An exposed tensor as float: (q − zero point) · scale for an integer tap."""
    if tap.scale is None:
        return np.asarray(values, dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - tap.zero_point) * tap.scale


def quantize_like(values: np.ndarray, tap: Tap) -> np.ndarray:
    """Float values through the tap's output Q and back (round half to even, saturate):
    what the deployed graph keeps of a float layer output."""
    if tap.scale is None:
        return np.asarray(values, dtype=np.float64)
    lo, hi = _QRANGE[tap.dtype]
    q = np.clip(np.round(np.asarray(values, dtype=np.float32) / np.float32(tap.scale))
                + tap.zero_point, lo, hi)
    return (q - tap.zero_point) * tap.scale
