"""The ONNX Q/DQ rewrite: a float ONNX graph + hilq's quantized layers (or, on the ONNX
route, ranges by tensor) -> the same graph with QuantizeLinear/DequantizeLinear.

Explicit Q/DQ is the one INT8 format ONNX Runtime, OpenVINO and TensorRT (10 and 11, which
dropped implicit calibration) all consume. We export the BN-folded *float* graph with
`torch.onnx.export` (the TorchScript exporter, `dynamo=False`: it still works in torch 2.13
and keeps parameter names, which is how ONNX nodes are mapped back to hilq layers), then edit
the graph with `onnx`, using the scales and zero-points held by the `QuantLayer`s.

Placement mirrors `onnxruntime.quantization.quantize_static(quant_format=QDQ)` so that ORT
fuses every unit into one integer kernel (DQ→Conv→Q = QLinearConv, DQ→Gemm→Q = QGemm,
DQ+DQ→Add→Q = QLinearAdd, DQ→GlobalAveragePool→Q = QLinearGlobalAveragePool):

- a quantized Conv/Gemm/MatMul gets Q→DQ on its input (the layer's own `act_scale/act_zp`),
  its weight as an INT8 initializer + DequantizeLinear (per-channel, weight axis), its bias as
  INT32 with scale s_in·s_w; a Conv/Gemm also gets Q→DQ on its output, so the unit fuses
  (a MatMul keeps a float output, which ORT fuses into MatMulIntegerToFloat);
- Add / average pools whose inputs are all integer become integer too (output calibrated);
  MaxPool / Flatten / Reshape / Transpose / (Un)Squeeze share one scale across input and
  output (ORT then drops their Q/DQ and moves uint8 data);
- a Relu (or Clip(0, 6)) after an integer unit is folded into the following Q's range when
  that range already clamps at zero (uint8, zero-point 0), as ORT's quantizer does; where it
  cannot be (a signed grid), it stays as DQ→Relu→Q;
- the graph's outputs (the logits) stay float, as in the fake-quant model;
- tensors that hilq's fake-quant model does not quantize (conv outputs feeding an Add, pool
  outputs) are min-max calibrated on the float graph with the same calibration
  data; a tensor feeding a quantized layer always uses that layer's qparams;
- a layer the `BitConfig` leaves float stays float (it reads the DQ output of its neighbour);
- weight-only Linear layers (`w4a16`, `w8a16`) become com.microsoft `MatMulNBits` (blocks of
  the spec's `group_size` along K, or one block per row for per-channel, packed two 4-bit
  codes per byte, low nibble first; signed codes stored offset by 2^(bits-1), ORT's default
  zero-point); weight-only convs have no integer kernel anywhere: INT8 weights +
  DequantizeLinear (per-group: their fake-quant float values), float compute.

For TensorRT (`placement="tensorrt"`, INT8 symmetric activations) Q/DQ go only where hilq
quantizes: each quantized layer's input and weights (narrow-range INT8), bias left float, as
NVIDIA's own toolkits export; TensorRT fuses Conv+ReLU+Q and residual adds itself, and the
graph computes exactly what the fake-quant model does.

Sub-8-bit activations (`w4a4`) are stored on the 8-bit container with their own scale, so
values inside the calibrated range are exact but out-of-range values clip at the container's
limits, not the 4-bit ones: no CPU engine has a 4-bit activation kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import ExportError, QuantSpec
from .transform import QuantLayer

COMPUTE = ("Conv", "Gemm", "MatMul")
ARITH = ("Add", "GlobalAveragePool", "AveragePool")
SAME_SCALE = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
ACTIVATIONS = ("Relu", "Clip")
PLACEMENTS = ("ort", "tensorrt")
ORT_KERNEL = {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "MatMulIntegerToFloat"}


# ---------------------------------------------------------------- qparams in ONNX terms

def _onnx_qparams(scale, zp, spec: QuantSpec, act_dtype: str) -> tuple[np.float32, int]:
    """hilq's (scale, zp) on its grid -> the same grid in the uint8/int8 container.

    An asymmetric hilq grid is unsigned (0..2^b-1), a symmetric one signed; shifting the
    zero-point by 128 moves the very same grid between uint8 and int8, exactly."""
    z = int(zp)
    if act_dtype == "uint8" and spec.symmetric:
        z += 128
    elif act_dtype == "int8" and not spec.symmetric:
        z -= 128
    return np.float32(float(scale)), z


def _calibrated_qparams(lo: float, hi: float, act_dtype: str) -> tuple[np.float32, int]:
    from .quantizer import qparams

    spec = QuantSpec(bits=8, symmetric=act_dtype == "int8")
    s, z = qparams(torch.tensor(lo), torch.tensor(hi), spec)
    return _onnx_qparams(s, z, spec, act_dtype)


# ---------------------------------------------------------------- weights

def _weight_codes(q: QuantLayer) -> np.ndarray:
    """Integer weight codes in the layer's layout, recovered exactly from the fake-quant
    weight (so repaired weights, `weight_override`, export as they were evaluated)."""
    from .transform import _weight_view_spec

    with torch.no_grad():
        w = q.quant_weight().detach()
        wv, spec = _weight_view_spec(w, q.weight_spec)
        if spec.granularity == "group":
            g = wv.reshape(wv.shape[0], -1, spec.group_size)
            codes = torch.round(g / q.w_scale.unsqueeze(-1)) + q.w_zp.unsqueeze(-1)
        else:
            shape = [-1] + [1] * (wv.dim() - 1) if q.w_scale.dim() else []
            codes = torch.round(wv / q.w_scale.reshape(shape)) + q.w_zp.reshape(shape)
        codes = codes.clamp(spec.qmin, spec.qmax)
    return codes.reshape(w.shape).to(torch.int64).numpy()


def _is_pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _nbits_blocks(q: QuantLayer) -> tuple[int, int] | None:
    """(container bits, block size) for MatMulNBits, or None when ORT has no such kernel."""
    spec = q.weight_spec
    k = q.layer.weight.shape[1]
    block = spec.group_size if spec.granularity == "group" else k
    if spec.granularity == "tensor" or not _is_pow2(block) or k % block:
        return None
    return (4 if spec.bits <= 4 else 8), block


def _pack_nbits(codes: np.ndarray, zp: np.ndarray, spec: QuantSpec, bits: int, block: int):
    """[N, K] codes -> MatMulNBits B [N, K/block, block·bits/8] (two 4-bit codes a byte, low
    nibble first) and packed zero-points (None = ORT's default 2^(bits-1), for signed codes)."""
    n, k = codes.shape
    offset = 2 ** (bits - 1) if spec.symmetric else 0
    u = (codes + offset).astype(np.uint8).reshape(n, k // block, block)
    if bits == 4:
        u = (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)
    if spec.symmetric:
        return u.astype(np.uint8), None
    z = zp.reshape(n, -1).astype(np.uint8)
    if bits == 4:
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        z = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)
    return u, z.reshape(-1).astype(np.uint8)


# ---------------------------------------------------------------- the graph edit

class _Graph:
    """The float ONNX graph plus the lookups the edit needs."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.proto, self.g = proto, proto.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        for node in self.g.node:   # Constant nodes (Clip bounds, Reshape shapes) count too
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self.new_inits: list = []

    def data_inputs(self, node) -> list[str]:
        return [t for t in node.input if t and t not in self.inits]

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def _clip_bounds(g: _Graph, node) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, np.inf
    vals = [float(g.inits[t]) if t in g.inits else None for t in node.input[1:3]]
    vals += [None] * (2 - len(vals))
    if any(v is None for v in vals):
        return None
    return vals[0], vals[1]


def _dq_weight(g: _Graph, name: str, codes: np.ndarray, scale, zp, axis: int | None, dtype):
    """Integer initializer + DequantizeLinear; returns the node and its float output."""
    from onnx import helper

    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp).astype(dtype)
    q = g.add_init(f"{name}_quantized", codes.astype(dtype))
    s = g.add_init(f"{name}_scale", scale)
    z = g.add_init(f"{name}_zero_point", zp)
    attrs = {"axis": axis} if axis is not None and scale.ndim else {}
    out = f"{name}_DequantizeLinear_Output"
    return helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{name}_DequantizeLinear",
                            **attrs), out


def insert_qdq(proto, qlayers: dict[str, QuantLayer], *, layer_of: dict[str, str],
               ranges_of, act_dtype: str = "uint8", placement: str = "ort") -> dict:
    """Edit the float ONNX graph `proto` in place into Q/DQ form (see the module docstring),
    in four phases: plan (which tensors are integer), qparams (their scale and zero point,
    from the layers or calibrated), fold (Relu/Clip into the Q before them), rewrite.
    `layer_of`: ONNX node -> layer (`quant.onnx_export` matches a PyTorch model's weights,
    the ONNX route names layers by node); `ranges_of`: tensors -> min-max over the
    calibration data, for the tensors no layer's qparams cover.
    Returns what the manifest records: the layer map and the calibrated extra tensors."""
    if act_dtype not in ("uint8", "int8"):
        raise ExportError(f"act_dtype must be uint8 or int8, not {act_dtype!r}")
    if placement not in PLACEMENTS:
        raise ExportError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    full = placement == "ort"
    g = _Graph(proto)
    kind = {}
    for node in g.g.node:
        q = qlayers.get(layer_of.get(node.name, ""))
        kind[node.name] = ("float" if q is None or q.weight_spec is None
                           else "wonly" if q.act_spec is None else "int")
    integer, qnodes = _plan(g, kind, qlayers, layer_of, full)
    qp, ranges, conflicts = _qparams(g, integer, kind, qlayers, layer_of, act_dtype,
                                     ranges_of)
    folded = _fold(g, integer, qnodes, qp, act_dtype)
    layer_map = _rewrite(proto, g, integer, kind, folded, qlayers, layer_of, qp, act_dtype, full)
    return {"layer_map": layer_map, "act_dtype": act_dtype, "placement": placement,
            "calibrated_tensors": {t: [float(a), float(b)] for t, (a, b) in ranges.items()},
            "folded_activations": sorted(folded), "qparam_conflicts": conflicts}


def _plan(g: _Graph, kind: dict, qlayers, layer_of, full: bool) -> tuple[dict, set]:
    """Which tensors are integer (tensor -> the tensor whose qparams it shares, itself for a
    new scale) and which nodes run on them. `full` (ORT placement): integer flows on through
    adds, pooling, reshapes and clamping activations; else only the layers' inputs."""
    integer: dict[str, str] = {}
    qnodes = set()
    for node in g.g.node:
        op, k = node.op_type, kind[node.name]
        if k == "int":
            q = qlayers[layer_of[node.name]]
            if q.weight_spec.granularity == "group":
                raise ExportError(f"layer {layer_of[node.name]}: per-group weights with "
                                  "quantized activations have no integer kernel; use "
                                  "per-channel weights (or a weight-only variant)")
            integer.setdefault(node.input[0], node.input[0])
            qnodes.add(node.name)
            # MatMul: float output, ORT's MatMulIntegerToFloat. A graph output (the logits)
            # stays float too (QGemm with a float output), as in the fake-quant model: an
            # 8-bit logit range set by calibration clips the top logits of inputs that
            # reach further (data-free calibration's logits span half a photograph's), and
            # clipped winners tie.
            if op != "MatMul" and full and node.output[0] not in g.outputs:
                integer[node.output[0]] = node.output[0]
        elif not full:
            continue
        elif op in ARITH and all(t in integer for t in g.data_inputs(node)):
            qnodes.add(node.name)
            integer[node.output[0]] = node.output[0]
        elif op in SAME_SCALE and node.input[0] in integer:
            qnodes.add(node.name)
            integer[node.output[0]] = integer[node.input[0]]
        elif op in ACTIVATIONS and node.input[0] in integer and _clip_bounds(g, node):
            qnodes.add(node.name)
            integer[node.output[0]] = node.output[0]
    return integer, qnodes


def _qparams(g: _Graph, integer: dict, kind: dict, qlayers, layer_of, act_dtype: str,
             ranges_of) -> tuple:
    """(tensor -> (scale, zp), the calibrated ranges, conflicts): each class of tensors that
    share a scale takes its consumers' activation qparams (the first one's if they disagree,
    recorded), or is calibrated (`ranges_of`) when no quantized layer reads it."""
    def root(t):
        while integer[t] != t:
            t = integer[t]
        return t

    classes: dict[str, list[str]] = {}
    for t in integer:
        classes.setdefault(root(t), []).append(t)
    params: dict[str, tuple] = {}         # class root -> (scale, zp)
    conflicts, to_calib = [], []
    for r, members in classes.items():
        users = [n for t in members for n in g.consumers.get(t, [])
                 if kind[n.name] == "int" and n.input[0] == t]
        if users:
            qs = [qlayers[layer_of[n.name]] for n in users]
            chosen = [_onnx_qparams(q.act_scale, q.act_zp, q.act_spec, act_dtype) for q in qs]
            params[r] = chosen[0]
            if any(c != chosen[0] for c in chosen[1:]):
                conflicts.append({"tensor": r, "layers": [layer_of[n.name] for n in users],
                                  "used": layer_of[users[0].name]})
        else:
            to_calib.append(r)
    ranges = ranges_of(to_calib) if to_calib else {}
    for r in to_calib:
        params[r] = _calibrated_qparams(*ranges[r], act_dtype)
    return (lambda t: params[root(t)]), ranges, conflicts


def _fold(g: _Graph, integer: dict, qnodes: set, qp, act_dtype: str) -> dict:
    """Fold Relu/Clip into the preceding integer unit's output Q where its range already
    clamps (zero point at qmin, top of the range inside the clip): relu node -> its input."""
    qmin, qmax = (0, 255) if act_dtype == "uint8" else (-128, 127)
    folded = {}
    for node in g.g.node:
        if node.op_type not in ACTIVATIONS or node.name not in qnodes:
            continue
        t = node.input[0]
        prod = g.producer.get(t)
        lo, hi = _clip_bounds(g, node)
        s, z = qp(node.output[0])
        if (prod is not None and prod.name in qnodes and prod.op_type not in SAME_SCALE
                and len(g.consumers.get(t, [])) == 1 and t not in g.outputs
                and z == qmin and lo == 0.0 and s * (qmax - z) <= hi * (1 + 1e-6)):
            folded[node.name] = t
    for name, t in folded.items():
        node = next(n for n in g.g.node if n.name == name)
        prod = g.producer[t]
        prod.output[list(prod.output).index(t)] = node.output[0]
        del integer[t]
    return folded


def _rewrite(proto, g: _Graph, integer: dict, kind: dict, folded: dict, qlayers, layer_of, qp,
             act_dtype: str, full: bool) -> dict:
    """Integer weights and biases, weight-only linears, and a Q/DQ pair after every integer
    tensor's producer (and after integer graph inputs); unused initializers dropped.
    Returns the layer map: node -> layer, op, precision, kernel."""
    from onnx import helper

    qdtype = np.uint8 if act_dtype == "uint8" else np.int8
    head, body, layer_map, uses_ms = [], [], {}, False

    def qdq_pair(t: str, src: str, dst: str) -> list:
        s, z = qp(t)
        sn = g.add_init(f"{t}_scale", np.float32(s))
        zn = g.add_init(f"{t}_zero_point", np.array(z, dtype=qdtype))
        mid = f"{t}_QuantizeLinear_Output"
        return [helper.make_node("QuantizeLinear", [src, sn, zn], [mid], name=f"{t}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [mid, sn, zn], [dst],
                                 name=f"{t}_DequantizeLinear")]

    graph_inputs = {i.name for i in g.g.input}
    for node in g.g.node:
        if node.name in folded:
            continue
        name = layer_of.get(node.name)
        k = kind[node.name]
        if k == "int":
            info = _quantize_compute(g, node, qlayers[name], qp, head, int_bias=full)
            layer_map[node.name] = {"layer": name, "op": node.op_type, "precision": info,
                                    "kernel": ORT_KERNEL[node.op_type] if full else "int8"}
        elif k == "wonly":
            replaced, kernel = _weight_only(g, node, qlayers[name], head)
            uses_ms |= kernel == "MatMulNBits"
            layer_map[node.name] = {"layer": name, "op": node.op_type,
                                    "precision": f"w{qlayers[name].weight_spec.bits}a16",
                                    "kernel": kernel}
            if replaced is not None:
                body += replaced
                continue
        elif name is not None:
            layer_map[node.name] = {"layer": name, "op": node.op_type, "precision": "fp32",
                                    "kernel": "float"}
        body.append(node)
        for i, o in enumerate(node.output):
            if o in integer and o not in graph_inputs:
                node.output[i] = f"{o}_float"
                body += qdq_pair(o, f"{o}_float", o)

    for t in graph_inputs & set(integer):
        head += qdq_pair(t, t, f"{t}_DequantizeLinear_Output")
        for n in body:
            for i, x in enumerate(n.input):
                if x == t:
                    n.input[i] = f"{t}_DequantizeLinear_Output"
    _replace_nodes(g, head + body)
    if uses_ms:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return layer_map


def _replace_nodes(g: _Graph, nodes: list) -> None:
    """The graph's nodes become `nodes`, with the new initializers; stale shapes and the
    initializers no node reads any more are dropped."""
    del g.g.node[:]
    g.g.node.extend(nodes)
    g.g.initializer.extend(g.new_inits)
    del g.g.value_info[:]
    used = {t for n in g.g.node for t in n.input}
    keep = [i for i in g.g.initializer if i.name in used]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)


def _transposed(node) -> bool:
    """Whether the node's weight initializer is the layer's weight transposed ([K, N]): a
    MatMul's always is (the exporter writes x @ Wᵀ), a Gemm's unless transB=1."""
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Gemm":
        return not any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return False


def _quantize_compute(g: _Graph, node, q: QuantLayer, qp, head: list, int_bias: bool) -> str:
    """Integer weight (and INT32 bias) initializers + DequantizeLinear for a quantized
    Conv/Gemm/MatMul; its activation Q/DQ is placed by the caller."""
    spec = q.weight_spec
    codes = _weight_codes(q)
    transposed = _transposed(node)
    per_channel = q.w_scale.dim() > 0
    axis = (1 if transposed else 0) if per_channel else None
    if transposed:
        codes = codes.T
    wnode, wout = _dq_weight(g, node.input[1], codes, q.w_scale.numpy(), q.w_zp.numpy(), axis,
                             np.int8 if spec.symmetric else np.uint8)
    head.append(wnode)
    node.input[1] = wout
    bias = g.inits.get(node.input[2]) if len(node.input) > 2 else None
    s_w = q.w_scale.numpy().astype(np.float32)
    # a Gemm's C may be written [1, N] (tf2onnx, ORT's MatMul+Add fusion): the same bias as
    # [N]; a C of any other shape stays float
    if bias is not None and s_w.size > 1 and bias.size == s_w.size:
        bias = bias.reshape(-1)
    if int_bias and bias is not None and (s_w.size == 1 or bias.shape == s_w.shape):
        s_in, _ = qp(node.input[0])
        bscale = (np.float32(s_in) * s_w).astype(np.float32)
        bias = bias.astype(np.float64)
        bq = np.clip(np.round(bias / bscale), -2**31, 2**31 - 1).astype(np.int32)
        bnode, bout = _dq_weight(g, node.input[2], bq, bscale, np.zeros(bscale.shape), 0, np.int32)
        head.append(bnode)
        node.input[2] = bout
    return f"w{spec.bits}a{q.act_spec.bits}"


def _weight_only(g: _Graph, node, q: QuantLayer, head: list) -> tuple[list | None, str]:
    """Weight-only layer: MatMulNBits for a Linear when ORT has the block shape, else the
    weight as INT8 + DequantizeLinear (per-channel) or, per-group, as its float values."""
    from onnx import helper

    spec = q.weight_spec
    codes = _weight_codes(q)
    nb = _nbits_blocks(q) if node.op_type in ("Gemm", "MatMul") else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    gemm_ok = node.op_type != "Gemm" or (
        attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        and attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1)
    if nb is not None and gemm_ok:
        bits, block = nb
        n, k = codes.shape
        packed, zp = _pack_nbits(codes, q.w_zp.numpy(), spec, bits, block)
        base = node.input[1]
        ins = [node.input[0], g.add_init(f"{base}_Q{bits}", packed),
               g.add_init(f"{base}_scales", q.w_scale.numpy().astype(np.float32).reshape(-1))]
        if zp is not None:
            ins.append(g.add_init(f"{base}_zero_points", zp))
        out = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_nobias"
        nodes = [helper.make_node("MatMulNBits", ins, [out], name=f"{node.name}_MatMulNBits",
                                  domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
        return nodes, "MatMulNBits"
    transposed = _transposed(node)
    if spec.granularity == "group":
        with torch.no_grad():
            w = q.quant_weight().detach().numpy().astype(np.float32)
        g.add_init(f"{node.input[1]}_fakequant", w.T if transposed else w)
        node.input[1] = f"{node.input[1]}_fakequant"
        return None, "float"
    axis = (1 if transposed else 0) if q.w_scale.dim() else None
    wnode, wout = _dq_weight(g, node.input[1], codes.T if transposed else codes,
                             q.w_scale.numpy(), q.w_zp.numpy(), axis,
                             np.int8 if spec.symmetric else np.uint8)
    head.append(wnode)
    node.input[1] = wout
    return None, "float"
