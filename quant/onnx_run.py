"""Running an ONNX graph on the host, by input name: the FP32 outputs an evaluation set
compares against, and the float tensors calibration observes.

This is ONNX Runtime as a calculator (all optimisations off, errors only), never a
measurement: timing happens in the agent, one artifact per process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .spec import SpecError

DYNAMIC_CHUNK = 16   # samples per run where the batch axis is free


def session(model, *, optimize: bool = False):
    """An ONNX Runtime CPU session on a path, bytes or ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class RunError(SpecError):
    """The graph does not run on the given inputs (the message says where)."""


def chunk_size(inputs, per_sample: dict, fixed: dict) -> int:
    """Samples per run: the static batch of a per-sample input (a file exported at batch 1
    takes one at a time); the given batch where fixed inputs (a state) are sized to it;
    else `DYNAMIC_CHUNK`."""
    for inp in inputs:
        if inp.name in per_sample and inp.file_dims and inp.file_dims[0] is not None:
            return inp.file_dims[0]
        if inp.name in per_sample and fixed:
            return inp.shape[0]
    return DYNAMIC_CHUNK


def chunks(per_sample: dict, fixed: dict, size: int) -> Iterator[dict]:
    """Feeds of `size` samples (the last one shorter), fixed inputs added to each."""
    n = len(next(iter(per_sample.values())))
    for start in range(0, n, size):
        yield {**{k: v[start:start + size] for k, v in per_sample.items()}, **fixed}


def run(sess, inputs, per_sample: dict, fixed: dict, names: list[str] | None = None
        ) -> list[np.ndarray]:
    """All samples through `sess`, outputs (`names`, default all) joined on axis 0."""
    names = names or [o.name for o in sess.get_outputs()]
    size = chunk_size(inputs, per_sample, fixed)
    try:
        parts = [sess.run(names, feed) for feed in chunks(per_sample, fixed, size)]
    except Exception as e:  # noqa: BLE001 — ORT's own error, in one line
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in next(
            chunks(per_sample, fixed, size)).items())
        msg = str(e).split("Status Message:")[-1].strip().splitlines()[0][:200]
        raise RunError(f"ONNX Runtime cannot run the graph on {shapes}: {msg}") from None
    return [np.concatenate([np.asarray(p[k]) for p in parts]) if np.asarray(parts[0][k]).ndim
            else np.asarray(parts[0][k]) for k in range(len(names))]


def minmax(proto, tensors: list[str], x: np.ndarray, batch: int = 64
           ) -> dict[str, tuple[float, float]]:
    """Min and max of the float tensors `tensors` of a one-input graph over `x`."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for t in tensors)
    sess = session(m)
    name = sess.get_inputs()[0].name
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for i in range(0, len(x), batch):
        for t, v in zip(tensors, sess.run(tensors, {name: x[i: i + batch]})):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}
