"""What INT8 can buy on this CPU at all: one GEMM and two ResNet-18 convolutions, FP32 against
INT8 (u8 activations × s8 weights, ONNX Runtime's x86 path), each kernel alone in its own process.

    python -m experiments.int8_ceiling [--threads 2] [--min-s 3] [--engines ort,openvino]

If a lone INT8 kernel runs no faster than its FP32 twin, no export of a whole network can show an
INT8 speed-up on this machine: the limit is the multiply-accumulate rate of the core (Zen 1 splits
256-bit integer multiplies into two 128-bit halves on one pipe, so u8×s8 via vpmaddubsw+vpmaddwd
peaks at the FP32 FMA rate), not the quantized graph. The Markdown table goes to stdout with the
CPU flags that decide it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")

# name: (kind, shape) — gemm (M, K, N); conv (C_in, C_out, H, W, k)
KERNELS = {
    "gemm 1024×1024×1024": ("gemm", (1024, 1024, 1024)),
    "conv 64→64 3×3 @56×56": ("conv", (64, 64, 56, 56, 3)),
    "conv 256→256 3×3 @14×14": ("conv", (256, 256, 14, 14, 3)),
}

TIMER = r"""
import json, statistics, sys, time
import numpy as np
engine, path, threads, s_min = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
x = np.load(path + ".npy")
if engine == "ort":
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    run = lambda: sess.run(None, {name: x})
else:
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    run = lambda: req.infer({0: x})
for _ in range(10):
    run()
t, t0 = [], time.perf_counter()
while len(t) < 20 or time.perf_counter() - t0 < s_min:
    a = time.perf_counter(); run(); t.append(time.perf_counter() - a)
print(json.dumps({"p50_ms": statistics.median(t) * 1e3, "n": len(t)}))
"""


def cpu_facts() -> tuple[str, list[str]]:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")
    family = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                   if ln.startswith("cpu family")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return f"{model} (family {family})", [f for f in CPU_FLAGS if f in flags]


def _model(nodes, inputs, output, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "k", inputs, [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def build(kind: str, shape: tuple, precision: str, rng: np.random.Generator):
    """One kernel as an ONNX model and its input: FP32 op, or the u8×s8 integer op ORT runs."""
    if kind == "gemm":
        m, k, n = shape
        if precision == "fp32":
            w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
            x = rng.standard_normal((m, k)).astype(np.float32)
            return _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n]), [w]), x
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w")
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
        return _model([helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                      helper.make_tensor_value_info("y", TensorProto.INT32, [m, n]), [w]), x
    cin, cout, h, wd, k = shape
    attrs = {"kernel_shape": [k, k], "pads": [k // 2] * 4}
    out = [1, cout, h, wd]
    if precision == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), "w")
        x = rng.standard_normal((1, cin, h, wd)).astype(np.float32)
        return _model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, wd])],
                      helper.make_tensor_value_info("y", TensorProto.FLOAT, out), [w]), x
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (cout, cin, k, k), dtype=np.int8), "w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                            ["y"], **attrs)
    x = rng.integers(0, 256, (1, cin, h, wd), dtype=np.uint8)
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, cin, h, wd])],
                  helper.make_tensor_value_info("y", TensorProto.UINT8, out), inits), x


def macs(kind: str, shape: tuple) -> int:
    if kind == "gemm":
        m, k, n = shape
        return m * k * n
    cin, cout, h, w, k = shape
    return cin * cout * h * w * k * k


def time_one(engine: str, path: Path, threads: int, min_s: float) -> float:
    out = subprocess.run([sys.executable, "-c", TIMER, engine, str(path), str(threads), str(min_s)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["p50_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-s", type=float, default=3.0)
    ap.add_argument("--engines", default="ort")
    args = ap.parse_args()
    model, flags = cpu_facts()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (kind, shape) in KERNELS.items():
            for engine in args.engines.split(","):
                ms = {}
                for precision in ("fp32", "int8"):
                    proto, x = build(kind, shape, precision, rng)
                    path = Path(tmp) / f"{kind}-{precision}.onnx"
                    onnx.save(proto, path)
                    np.save(str(path) + ".npy", x)
                    ms[precision] = time_one(engine, path, args.threads, args.min_s)
                gops = {p: 2 * macs(kind, shape) / (v * 1e-3) / 1e9 for p, v in ms.items()}
                rows.append((label, engine, ms, gops))
                print(f"{label} {engine}: {ms}", file=sys.stderr)
    print(f"CPU: {model}; flags: {', '.join(flags)}; {args.threads} threads; "
          "each kernel alone in its own process\n")
    print("| kernel | engine | FP32 ms | INT8 ms | FP32 GOP/s | INT8 GOP/s | INT8 speed-up |")
    print("|---|---|---|---|---|---|---|")
    for label, engine, ms, gops in rows:
        print(f"| {label} | {engine} | {ms['fp32']:.2f} | {ms['int8']:.2f} | "
              f"{gops['fp32']:.0f} | {gops['int8']:.0f} | {ms['fp32'] / ms['int8']:.2f}× |")


if __name__ == "__main__":
    main()
