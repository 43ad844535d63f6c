"""An FP32 ONNX file as a hilq model.

Route: the graph is converted to a PyTorch `fx.GraphModule` by onnx2torch (ENOT's converter,
Conv → `nn.Conv2d`, Gemm → `nn.Linear`, BatchNormalization → `nn.BatchNorm2d`, ...), and
from there everything is hilq's one pipeline: BN folding, observers, repairs, ZeroQ,
sensitivity (KL and the Hessian need autograd), QAT, and the Q/DQ export. Quantizing on the
ONNX graph directly would have meant a second implementation of all of those. The FP32
variant is not converted: it is the user's file, benchmarked as it is, and the converted
model's outputs on the reference inputs check the conversion.

onnx2torch imports torchvision for two converters only (NonMaxSuppression, RoiAlign), and
PyPI's torchvision does not load beside the CPU torch build hilq pins ("operator
torchvision::nms does not exist"). When it does not load, hilq gives onnx2torch a
placeholder `torchvision` whose ops raise; a model with those ops gets a one-line error.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from . import ModelError


def _placeholder_torchvision() -> None:
    def unsupported(*_a, **_k):
        raise ModelError("this ONNX model uses NonMaxSuppression or RoiAlign, which need "
                         "torchvision, and torchvision does not load here")

    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unsupported
    tv.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops


def _convert():
    try:
        from onnx2torch import convert
    except (ImportError, RuntimeError) as e:   # RuntimeError: a torchvision built for another torch
        if isinstance(e, ImportError) and "onnx2torch" in str(e):
            raise ModelError("ONNX models need onnx2torch: pip install --no-deps "
                             "onnx2torch==1.5.15 (its torchvision dependency does not load "
                             "beside the CPU torch)") from None
        _placeholder_torchvision()
        for name in [n for n in sys.modules if n.startswith("onnx2torch")]:
            del sys.modules[name]
        from onnx2torch import convert
    return convert


def read(path: Path):
    """The checked ModelProto, or one line saying why not."""
    import onnx

    if not path.is_file():
        raise ModelError(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:   # noqa: BLE001 — onnx raises many types; all mean "not loadable"
        raise ModelError(f"cannot load ONNX file {path}: {str(e).splitlines()[0][:200]}") from None
    inputs = _graph_inputs(proto)
    if len(inputs) != 1:
        raise ModelError(f"{path}: {len(inputs)} graph inputs; hilq benchmarks models with one "
                         "input")
    return proto


def _graph_inputs(proto) -> list:
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def input_shape(proto, path: Path, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """One sample's shape (no batch): from the file, or `--input-shape` where the file has
    dynamic dimensions; a given shape must agree with the file's static ones."""
    inp = _graph_inputs(proto)[0]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim]
    if given is not None:
        full = tuple(given)
        if len(full) != len(dims):
            raise ModelError(f"--input-shape {','.join(map(str, full))} has {len(full)} "
                             f"dimensions; {path} takes {len(dims)} ({_show(dims)})")
        for g, d in zip(full, dims):
            if d is not None and d != g:
                raise ModelError(f"--input-shape {','.join(map(str, full))} does not match "
                                 f"{path}'s input {_show(dims)}")
        return full[1:]
    if any(d is None for d in dims[1:]):
        raise ModelError(f"{path} has dynamic input dimensions {_show(dims)}: give "
                         "--input-shape (e.g. 1,3,224,224)")
    return tuple(dims[1:])


def _show(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def input_dtype(proto) -> str:
    import onnx

    t = _graph_inputs(proto)[0].type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(t).name


def build(proto, path: Path):
    """The converted float model (one line when onnx2torch cannot convert an op)."""
    convert = _convert()
    try:
        net = convert(proto).eval()
    except NotImplementedError as e:
        raise ModelError(f"{path}: onnx2torch cannot convert it: {str(e).splitlines()[0]}") from None
    _check_batches(net, proto, path)
    return net


def _check_batches(net, proto, path: Path) -> None:
    """Calibration, evaluation and sensitivity run many samples at once: a graph that bakes
    a batch of 1 into a Reshape (an export without a dynamic batch axis) fails there with a
    shape error deep inside; say so here, in one line, with the fix."""
    import numpy as np
    import torch

    inp = _graph_inputs(proto)[0]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim]
    if not dims or dims[0] not in (None, 1) or any(d is None for d in dims[1:]):
        return          # a fixed larger batch, or sample dims only --input-shape knows
    dtype = torch.from_numpy(np.zeros(0, input_dtype(proto))).dtype
    try:
        with torch.no_grad():
            net(torch.zeros((2, *dims[1:]), dtype=dtype))
    except Exception as e:  # noqa: BLE001 — any failure at batch 2 is the same problem
        raise ModelError(f"{path} runs only at batch 1 ({type(e).__name__} at batch 2: "
                         f"{str(e).splitlines()[0][:120]}); export it with a dynamic batch "
                         "axis (torch.onnx.export(..., dynamic_axes={'<input>': {0: 'batch'}}))"
                         ) from None
