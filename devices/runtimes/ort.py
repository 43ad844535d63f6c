"""ONNX Runtime: runs the ONNX (FP32 or Q/DQ) artifact on the CPU (or a listed provider)."""

from __future__ import annotations

import numpy as np

_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
           "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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
    sess = ort.InferenceSession(path, so, providers=providers)
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
             "graph_optimization_level": "ORT_ENABLE_ALL"}
    return Loaded(run=run, inputs=inputs, facts=facts)
