"""Integer-only reference: runs an exported Q/DQ ONNX graph with integer arithmetic only.

It reads the *exported graph* (not the QuantLayer model), so it has exactly the
quantization points, scales and zero-points the engine runs: any difference from ONNX
Runtime is rounding, which is what this module exists to pin down. Each integer unit
(DQ inputs → Conv/Gemm/MatMul/Add/pool/Relu → Q) is computed as on an integer-only device:

- products of zero-point-shifted int8/uint8 codes accumulated in int32 (int64 numpy arrays
  that never exceed the int32 range for 8-bit layers), plus the INT32 bias;
- requantization by a dyadic multiplier: the real multiplier m = s_in·s_w/s_out is written
  m ≈ M0·2^−n with a 31-bit integer M0 (2^30 ≤ M0 < 2^31, as gemmlowp and TFLite do), the
  product acc·M0 formed in int64 and shifted right by n, rounding half away from zero;
  then + zero-point and an integer clamp to the container's range;
- ReLU/Clip: an integer clamp (at the zero-point for ReLU);
- Add: both inputs shifted left by 20 bits and rescaled to a common scale 2·max(s_a, s_b)
  with dyadic multipliers, summed, requantized to the output (TFLite's scheme);
- average pools: the integer sum of the window, requantized with m = s_in/(s_out·count);
- MaxPool / Flatten / Reshape / Transpose / (Un)Squeeze move codes unchanged.

Graphs it reads: `quant.export`'s ORT placement (and ORT's own `quantize_static` QDQ
output), where every unit ends in a Q, except the graph's outputs: a Conv/Gemm producing one
(the logits, which the export keeps float) yields its int32 accumulator with scale s_in·s_w,
which is that float tensor exactly. Any other unit with a float output (a MatMul fused into
MatMulIntegerToFloat, the TensorRT placement's float bias) is not integer-only and raises
NotImplementedError naming the node.

The only float operations are at the boundary: quantizing the float input (QuantizeLinear,
identical to ORT's: x/s rounded half to even) and dequantizing the outputs.

Where rounding differs from ONNX Runtime (CPU, MLAS), so results may differ by 1 LSB:
- ORT requantizes in float: q = nearbyint(float(acc)·float32(m)) + z, i.e. the multiplier
  rounded to 24 significant bits (ours: 31), acc converted to float32 (inexact above 2^24),
  and ties rounded half to even (ours: half away from zero);
- ORT's QLinearAdd and QLinearGlobalAveragePool also compute in float32 (scaled sum, round
  half to even), where we use the fixed-point schemes above.
Measured on digits-cnn (706 test and calibration images): at most 1 LSB, 0.03% of logits
differ.

Not rounding but worth knowing: on x86 without VNNI (AVX2, AVX-512 without VNNI), ORT's
default U8S8 kernels multiply with vpmaddubsw, which *saturates* the int16 sum of each pair
of u8×s8 products (255·127·2 > 32767). Those outputs are then off by many LSB (digits-cnn:
up to 22 LSB, ~1% of logits); `session.x64quantprecision=1` selects exact kernels, which
agree with this reference to 1 LSB. The reference never saturates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADD_SHIFT = 20
LINEAR = ("Conv", "Gemm", "MatMul")
COMPUTE = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool", "AveragePool", "Relu", "Clip",
           "MaxPool")
MOVES = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def dyadic(m: float) -> tuple[int, int]:
    """(M0, n) with m ≈ M0·2^−n, M0 a 31-bit integer (2^30 ≤ M0 < 2^31); exact when m has at
    most 31 significant bits, else within a relative 2^−31."""
    if not m > 0 or not math.isfinite(m):
        raise ValueError(f"dyadic multiplier must be positive and finite, got {m}")
    mant, exp = math.frexp(m)          # m = mant·2^exp, 0.5 <= mant < 1
    m0 = round(mant * (1 << 31))
    if m0 == 1 << 31:
        m0, exp = m0 >> 1, exp + 1
    return m0, 31 - exp


def rounding_shift(p: np.ndarray, n) -> np.ndarray:
    """p·2^−n rounded half away from zero, in int64 (n may be per-channel, broadcastable)."""
    p = np.asarray(p, np.int64)
    n = np.asarray(n, np.int64)
    if np.any(n < 1):
        raise ValueError("multiplier >= 2^30 is not supported")
    big = n > 62                       # |p| < 2^62: the result is 0
    ns = np.where(big, 1, n)
    r = (np.abs(p) + (np.int64(1) << (ns - 1))) >> ns
    return np.where(big, 0, np.sign(p) * r)


def requantize(acc: np.ndarray, multiplier, zero_point: int, lo: int, hi: int,
               axis: int | None = None) -> np.ndarray:
    """clamp(round(acc·m) + z) with m applied as a dyadic multiplier (per-channel along
    `axis` when `multiplier` is an array)."""
    mult = np.atleast_1d(np.asarray(multiplier, np.float64))
    pairs = [dyadic(float(m)) for m in mult]
    m0 = np.array([p[0] for p in pairs], np.int64)
    n = np.array([p[1] for p in pairs], np.int64)
    if len(mult) > 1:
        shape = [1] * acc.ndim
        shape[axis] = -1
        m0, n = m0.reshape(shape), n.reshape(shape)
    else:
        m0, n = m0[0], n[0]
    return np.clip(rounding_shift(acc.astype(np.int64) * m0, n) + zero_point, lo, hi)


@dataclass
class QTensor:
    """Integer codes with their (per-tensor or per-axis) scale and zero-point."""

    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    axis: int = 1

    def centered(self) -> np.ndarray:
        """q − zp as int64 (per-axis zero-points broadcast along `axis`)."""
        return self.q.astype(np.int64) - self._b(self.zp.astype(np.int64))

    def _b(self, v: np.ndarray) -> np.ndarray:
        if v.ndim == 0 or v.size == 1:
            return v.reshape(())
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return v.reshape(shape)

    def dequantize(self) -> np.ndarray:
        return (self.centered() * self._b(self.scale.astype(np.float32))).astype(np.float32)


_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
           np.dtype(np.int32): (-2**31, 2**31 - 1)}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv(x: np.ndarray, w: np.ndarray, a: dict) -> np.ndarray:
    """Integer 2-D convolution (NCHW, grouped) of centered codes, int64 accumulators."""
    from numpy.lib.stride_tricks import sliding_window_view

    groups = int(a.get("group", 1))
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("intref: Conv auto_pad")
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))   # padding is zero-point = 0 centered
    o, cg, kh, kw = w.shape
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]               # N, C, OH, OW, kh, kw
    n, _, oh, ow = win.shape[:4]
    out = np.empty((n, o, oh, ow), np.int64)
    og = o // groups
    for gi in range(groups):
        xs = win[:, gi * cg:(gi + 1) * cg]
        ws = w[gi * og:(gi + 1) * og]
        out[:, gi * og:(gi + 1) * og] = np.einsum("nchwij,ocij->nohw", xs, ws, optimize=True)
    return out


def _pool_windows(x: np.ndarray, a: dict, pad_value) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    if a.get("ceil_mode", 0) or a.get("dilations", [1, 1]) != [1, 1]:
        raise NotImplementedError("intref: pooling with ceil_mode or dilations")
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


class IntegerReference:
    """`IntegerReference(onnx_path_or_model)(x)` -> the graph outputs as `QTensor`s, computed
    with integer arithmetic only (see the module docstring)."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        if isinstance(model, str | Path):
            model = onnx.load(str(model))
        self.graph = model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for t in node.input:
                self.consumers.setdefault(t, []).append(node)

    def _q_after(self, node):
        """The QuantizeLinear that alone consumes `node`'s output: the unit's requant target."""
        users = self.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            raise NotImplementedError(f"intref: {node.op_type} {node.name} is not followed by a "
                                      "single QuantizeLinear (its output would be float)")
        q = users[0]
        scale = self.inits[q.input[1]].astype(np.float32)
        zp = self.inits[q.input[2]]
        if scale.size != 1:
            raise NotImplementedError("intref: per-channel activation quantization")
        return q, float(scale), int(zp), _RANGES[zp.dtype]

    def __call__(self, x: np.ndarray) -> list[QTensor]:
        env: dict[str, QTensor] = {}
        floats = {self.graph.input[0].name: np.asarray(x)}
        outputs = {o.name for o in self.graph.output}
        done = set()
        for node in self.graph.node:
            if node.name in done or node.op_type == "Constant":
                continue
            op, a = node.op_type, _attrs(node)
            if op == "QuantizeLinear":
                if node.input[0] not in floats:
                    raise NotImplementedError(f"intref: {node.name} quantizes a float tensor "
                                              "computed inside the graph")
                s, z = self.inits[node.input[1]], self.inits[node.input[2]]
                lo, hi = _RANGES[z.dtype]
                q = np.clip(np.rint(floats[node.input[0]].astype(np.float32) / s) + z, lo, hi)
                env[node.output[0]] = QTensor(q.astype(np.int64), np.asarray(s), np.asarray(z))
            elif op == "DequantizeLinear":
                src = node.input[0]
                base = env[src] if src in env else QTensor(self.inits[src].astype(np.int64),
                                                           None, None)
                env[node.output[0]] = QTensor(base.q, self.inits[node.input[1]],
                                              self.inits[node.input[2]], a.get("axis", 1))
            elif op in LINEAR and node.output[0] in outputs:
                # a graph output left float (the logits): the int32 accumulator itself, with
                # scale s_in·s_w per channel and zero point 0, is exactly that float tensor
                acc, axis, scale = self._accumulate(node, a, env)
                env[node.output[0]] = QTensor(acc, scale.astype(np.float32),
                                              np.zeros((), np.int64), axis)
            elif op in COMPUTE or op in MOVES:
                qnode, s_out, z_out, (lo, hi) = self._q_after(node)
                env[qnode.output[0]] = QTensor(self._unit(node, a, env, s_out, z_out, lo, hi),
                                               np.asarray(s_out, np.float32), np.asarray(z_out))
                done.add(qnode.name)
            else:
                raise NotImplementedError(f"intref: no integer rule for {op} ({node.name})")
        out = []
        for o in self.graph.output:
            if o.name in env:
                out.append(env[o.name])
                continue
            dq = next((n for n in self.graph.node if n.output[0] == o.name), None)
            if dq is None or dq.op_type != "DequantizeLinear":
                raise NotImplementedError(f"intref: output {o.name} is not a DequantizeLinear")
            out.append(env[dq.output[0]])
        return out

    def _accumulate(self, node, a, env) -> tuple[np.ndarray, int, np.ndarray]:
        """A Conv/Gemm/MatMul unit's int32 accumulator (bias added), its channel axis, and
        its scale s_in·s_w (per output channel)."""
        op = node.op_type
        x, w, *rest = [env[t] for t in node.input if t in env]
        xc, wc = x.centered(), w.centered()
        if op == "Conv":
            acc = _conv(xc, wc, a)
            ch_axis = 1
        elif op == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise NotImplementedError("intref: Gemm with transA/alpha/beta")
            acc = xc @ (wc.T if a.get("transB", 0) else wc)
            ch_axis = 1
        else:
            acc = xc @ wc
            ch_axis = acc.ndim - 1
        if rest:
            shape = [1] * acc.ndim
            shape[ch_axis] = -1
            acc = acc + rest[0].q.astype(np.int64).reshape(shape)
        return acc, ch_axis, float(x.scale) * w.scale.astype(np.float64).reshape(-1)

    def _unit(self, node, a, env, s_out, z_out, lo, hi) -> np.ndarray:
        op = node.op_type
        ins = [env[t] for t in node.input if t in env]
        x = ins[0]
        sx = float(x.scale)
        if op in LINEAR:
            acc, ch_axis, scale = self._accumulate(node, a, env)
            return requantize(acc, scale / s_out, z_out, lo, hi, axis=ch_axis)
        if op == "Add":
            y = ins[1]
            twice = 2 * max(sx, float(y.scale))
            acc = sum(requantize(t.centered() << ADD_SHIFT, float(t.scale) / twice, 0,
                                 -2**62, 2**62) for t in (x, y))
            return requantize(acc, twice / ((1 << ADD_SHIFT) * s_out), z_out, lo, hi)
        if op == "GlobalAveragePool":
            xc = x.centered()
            count = xc.shape[2] * xc.shape[3]
            acc = xc.sum(axis=(2, 3), keepdims=True)
            return requantize(acc, sx / (s_out * count), z_out, lo, hi)
        if op == "AveragePool":
            xc = x.centered()
            win = _pool_windows(xc, a, 0)
            acc = win.sum(axis=(-2, -1))
            count = np.prod(a["kernel_shape"])
            if not a.get("count_include_pad", 0) and any(a.get("pads", [0])):
                raise NotImplementedError("intref: AveragePool excluding pads")
            return requantize(acc, sx / (s_out * count), z_out, lo, hi)
        if op in ("Relu", "Clip"):
            bounds = [0.0, None] if op == "Relu" else [
                float(self.inits[t]) if t else None for t in (list(node.input[1:3]) + ["", ""])[:2]]
            # bounds in the input's integer domain (its values are multiples of s_x)
            c_lo = None if bounds[0] is None else math.ceil(bounds[0] / sx)
            c_hi = None if bounds[1] is None else math.floor(bounds[1] / sx)
            return requantize(np.clip(x.centered(), c_lo, c_hi), sx / s_out, z_out, lo, hi)
        if op == "MaxPool":
            q = _pool_windows(x.q, a, np.iinfo(np.int64).min).max(axis=(-2, -1))
            return self._move(q, x, s_out, z_out, lo, hi)
        # data movement: codes unchanged
        q = x.q
        if op == "Flatten":
            axis = a.get("axis", 1)
            q = q.reshape(int(np.prod(q.shape[:axis])), -1)
        elif op == "Reshape":
            shape = self.inits[node.input[1]]
            q = q.reshape([q.shape[i] if d == 0 else d for i, d in enumerate(shape)])
        elif op == "Transpose":
            q = q.transpose(a.get("perm"))
        elif op == "Squeeze":
            axes = a.get("axes") or (self.inits[node.input[1]].tolist() if len(node.input) > 1 else None)
            q = np.squeeze(q, axis=tuple(axes) if axes else None)
        elif op == "Unsqueeze":
            axes = a.get("axes") or self.inits[node.input[1]].tolist()
            q = np.expand_dims(q, tuple(axes))
        return self._move(q, x, s_out, z_out, lo, hi)

    @staticmethod
    def _move(q, x: QTensor, s_out, z_out, lo, hi) -> np.ndarray:
        """Codes that only moved: unchanged when the output Q has the same qparams."""
        if np.float32(x.scale) == np.float32(s_out) and int(x.zp) == z_out:
            return np.clip(q, lo, hi)
        return requantize(q.astype(np.int64) - int(x.zp), float(x.scale) / s_out, z_out, lo, hi)


def run(model, x: np.ndarray) -> list[np.ndarray]:
    """The graph outputs, dequantized to float, from the integer-only reference."""
    return [t.dequantize() for t in IntegerReference(model)(x)]
