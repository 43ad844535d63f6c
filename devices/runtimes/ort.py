"""ONNX Runtime: runs the ONNX (FP32 or Q/DQ) artifact on the CPU (or a listed provider).

Which layers ran in integer arithmetic is read from the engine, not assumed: at load, ORT
writes the graph it actually optimized (`optimized_model_filepath`); `kernels()` lists its
integer compute nodes (QLinearConv, QGemm, MatMulIntegerToFloat, MatMulNBits, ...) and the
float ones (Conv, FusedConv, NCHWc Conv, Gemm, MatMul, ...). Without the `onnx` package it
falls back to one profiled run in a separate session, whose node events name the kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref

import numpy as np

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
           "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "MatMulBnb4",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
               "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
               "QAttention", "DynamicQuantizeLSTM")
FLOAT_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
             "Attention")


def classify(ops) -> dict:
    """{"integer": [names], "float": [names], "detail": [{name, op, domain}]} over
    (name, op_type, domain, has_weight) tuples of the nodes ORT ran. A float MatMul of two
    activations (attention scores) is no layer: it is left out, as it has no weights to
    quantize; `has_weight` None (unknown, profiling fallback) counts it as a layer."""
    out = {"integer": [], "float": [], "detail": []}
    for name, op, domain, has_weight in ops:
        if op in INTEGER_OPS:
            out["integer"].append(name)
        elif op in FLOAT_OPS and has_weight is not False:
            out["float"].append(name)
        else:
            continue
        out["detail"].append({"name": name, "op": op,
                              "domain": "ai.onnx" if domain == "" else domain})
    return out


def _optimized_ops(path: str) -> list:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [(n.name, n.op_type, n.domain, any(t in consts for t in n.input[1:]))
            for n in graph.node]


def _profiled_ops(model_path: str, providers, inputs) -> list:
    """One profiled run in a throw-away session (never the timed one): its node events."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="hilq-ort-prof-"), "p")
    sess = ort.InferenceSession(model_path, so, providers=providers)
    rng = np.random.default_rng(0)
    sess.run(None, {n: rng.random(s).astype(d) for n, s, d in inputs})
    prof = sess.end_profiling()
    try:
        with open(prof) as f:
            events = json.load(f)
    finally:
        os.unlink(prof)
        os.rmdir(os.path.dirname(prof))
    ops, seen = [], set()
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "op_name" in args and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            if name not in seen:
                seen.add(name)
                ops.append((name, args["op_name"], None, None))   # no domain, no weights
    return ops


def precisions() -> dict[str, list[str]]:
    return {"conv": ["fp32", "w8a8"], "linear": ["fp32", "w8a8", "w4a16", "w8a16"]}


def load(path: str, protocol: dict):
    import onnxruntime as ort

    from . import Loaded

    so = ort.SessionOptions()
    threads = int(protocol.get("threads", 0))
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = protocol.get("providers") or ["CPUExecutionProvider"]
    tmp = tempfile.mkdtemp(prefix="hilq-ort-", dir=protocol.get("scratch_dir"))
    optimized = os.path.join(tmp, "optimized.onnx")
    so.optimized_model_filepath = optimized
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                "optimized.onnx.data")   # large models: weights beside it
    so.log_severity_level = 3   # the "hardware-specific optimized model" notice is expected
    # x86 without VNNI: ORT's default U8S8 kernels (vpmaddubsw) saturate int16 pair sums;
    # "1" selects exact (slower) kernels. Off by default, as deployed; recorded in facts.
    precise = bool(protocol.get("ort_x64_quant_precision", False))
    so.add_session_config_entry("session.x64quantprecision", "1" if precise else "0")
    try:
        sess = ort.InferenceSession(path, so, providers=providers)
    except Exception:
        # EPs that compile subgraphs (TensorRT, OpenVINO EP) cannot save the optimized
        # model: open it without, and let kernels() profile instead
        so.optimized_model_filepath = ""
        try:
            sess = ort.InferenceSession(path, so, providers=providers)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    batch = int(protocol.get("batch", 1))
    inputs = []
    for i in sess.get_inputs():
        shape = tuple(batch if not isinstance(d, int) else d for d in i.shape)
        inputs.append((i.name, shape, _DTYPES.get(i.type, "float32")))
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict) -> list[np.ndarray]:
        return sess.run(names, feeds)

    facts = {"engine": "onnxruntime", "version": ort.__version__,
             "providers": sess.get_providers(), "intra_op_threads": threads,
             "graph_optimization_level": "ORT_ENABLE_ALL", "x64_quant_precision": precise}

    def kernels() -> dict:
        if os.path.isfile(optimized):
            try:
                return classify(_optimized_ops(optimized))
            except ImportError:   # no onnx package on this device
                pass
        return classify(_profiled_ops(path, providers, inputs))

    loaded = Loaded(run=run, inputs=inputs, facts=facts, kernels=kernels)
    # the optimized-model folder goes on close(), or when the session is dropped, or at exit
    loaded.close = weakref.finalize(loaded, shutil.rmtree, tmp, True)
    return loaded
