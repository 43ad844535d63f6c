"""Tiny real ONNX models for device tests (built with onnx.helper, run by real ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from hilq.quant.artifact import Artifact
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx(path: Path, width: int = 64, depth: int = 2, seed: int = 0) -> Path:
    """x[batch, width] -> (MatMul, Relu) x depth; the batch dimension is symbolic."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for k in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{k}"], [f"m{k}"]),
                  helper.make_node("Relu", [f"m{k}"], [f"y{k}"])]
        prev = f"y{k}"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", width])], [helper.make_tensor_value_info(
            prev, TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return Path(path)


def tiny_artifact(dir: Path, variant: str = "fp32", **kw) -> Artifact:
    Path(dir).mkdir(parents=True, exist_ok=True)
    path = tiny_onnx(Path(dir) / f"tiny-{variant}.onnx", **kw)
    return Artifact.create(path, model="tiny", variant=variant, input_shape=[1, kw.get("width", 64)])


def reference_npz(artifact: Artifact, path: Path, scale: float = 1.0, n: int = 2) -> Path:
    """`n` inputs and the outputs ONNX Runtime gives for them (times `scale`, to make a wrong
    one)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(artifact.path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((n, sess.get_inputs()[0].shape[1])).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    np.savez(path, **{"input:x": x, "output:0": y * scale})
    return Path(path)
