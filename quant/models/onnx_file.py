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
from dataclasses import dataclass
from pathlib import Path

from . import ModelError


@dataclass(frozen=True)
class InputSpec:
    """One graph input as hilq feeds it: a static shape (batch first where the input has
    one), its numpy dtype, and the file's own dimensions (None = dynamic), which the
    engines are told to fix at `shape`."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file_dims: tuple[int | None, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "file_dims": [d if d is not None else None for d in self.file_dims]}


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
    if not _graph_inputs(proto):
        raise ModelError(f"{path}: the graph has no inputs to feed")
    return proto


def _graph_inputs(proto) -> list:
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def file_dims(value_info) -> tuple[int | None, ...]:
    """A graph input's dimensions, None where dynamic: a named dimension (`batch`,
    `p2o.DynamicDimension.0`), an unnamed one (`?`), and `-1` or `0`, which exporters such
    as Paddle2ONNX write for "any"."""
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in value_info.type.tensor_type.shape.dim)


def inputs_of(proto, path: Path, given: dict[str, tuple[int, ...]] | None = None
              ) -> tuple[InputSpec, ...]:
    """Every graph input at a static shape (batch first, where it has one): the file's
    static dimensions, `given` (input name -> shape; "" for the one unnamed `--input-shape`)
    for dynamic ones, and 1 for a dynamic leading (batch) axis nobody sized. A given shape
    must agree with the file's static dimensions; anything else still dynamic is one line
    naming the input."""
    import onnx

    graph_inputs = _graph_inputs(proto)
    given = dict(given or {})
    if "" in given:
        if len(graph_inputs) != 1 and len([i for i in graph_inputs if None in file_dims(i)]) != 1:
            names = ", ".join(i.name for i in graph_inputs)
            raise ModelError(f"--input-shape {_text(given[''])}: {path} has {len(graph_inputs)} "
                             f"inputs ({names}); name each: --input-shape NAME=1,3,224,224")
        target = graph_inputs[0] if len(graph_inputs) == 1 else next(
            i for i in graph_inputs if None in file_dims(i))
        given[target.name] = given.pop("")
    unknown = sorted(set(given) - {i.name for i in graph_inputs})
    if unknown:
        raise ModelError(f"--input-shape {unknown[0]}=...: {path} has no input {unknown[0]!r} "
                         f"(inputs: {', '.join(i.name for i in graph_inputs)})")
    out = []
    batch_names = {_param(i, 0) for i in graph_inputs} - {None}
    for inp in graph_inputs:
        dims = file_dims(inp)
        # a dimension named like some input's batch axis (silero's state [2, batch, 128])
        # is that batch: sized with it, not asked for
        dims = tuple(1 if d is None and i > 0 and _param(inp, i) in batch_names else d
                     for i, d in enumerate(dims))
        shape = given.get(inp.name)
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != len(dims) or any(d is not None and d != g
                                               for g, d in zip(shape, dims)):
                raise ModelError(f"--input-shape {_text(shape, inp.name)} does not match {path}'s "
                                 f"input {inp.name} {_show(dims)}")
        elif any(d is None for d in dims[1:]):
            raise ModelError(f"{path}: input {inp.name} has dynamic dimensions {_show(dims)}: "
                             f"give --input-shape {inp.name}=" + ",".join(
                                 "1" if d is None and i == 0 else "N" if d is None else str(d)
                                 for i, d in enumerate(dims)))
        else:
            shape = tuple(1 if d is None else d for d in dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name
        out.append(InputSpec(inp.name, shape, dtype, dims))
    return tuple(out)


def _param(value_info, axis: int) -> str | None:
    dims = value_info.type.tensor_type.shape.dim
    return dims[axis].dim_param or None if len(dims) > axis else None


def _text(shape, name: str = "") -> str:
    return (f"{name}=" if name else "") + ",".join(map(str, shape))


def _show(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


class NotConvertible(ModelError):
    """onnx2torch cannot turn this file into PyTorch: the ONNX route quantizes it instead."""


def build(proto, path: Path):
    """The converted float model (one line, `NotConvertible`, when onnx2torch cannot)."""
    if len(_graph_inputs(proto)) != 1:
        raise NotConvertible(f"{path}: {len(_graph_inputs(proto))} inputs; the PyTorch route "
                             "takes one (the ONNX route quantizes several)")
    convert = _convert()
    try:
        net = convert(proto).eval()
    except Exception as e:  # noqa: BLE001 — onnx2torch raises KeyError, NotImplementedError, ...
        first = (str(e).splitlines() or [""])[0][:160]
        raise NotConvertible(f"{path}: onnx2torch cannot convert it ({type(e).__name__}: "
                             f"{first})") from None
    _check_batches(net, proto, path)
    return net


def _check_batches(net, proto, path: Path) -> None:
    """Calibration, evaluation and sensitivity run many samples at once through the
    converted model. A graph that bakes a batch of 1 into a Reshape fails there, or worse,
    runs and mixes the samples (ddddocr's detector returns (1, 2·anchors, 6) at batch 2).
    Such a file is `NotConvertible`: the ONNX route runs it one sample at a time."""
    import numpy as np
    import torch

    inp = _graph_inputs(proto)[0]
    dims = file_dims(inp)
    if not dims or dims[0] not in (None, 1) or any(d is None for d in dims[1:]):
        return          # a fixed larger batch, or sample dims only --input-shape knows
    import onnx

    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    dtype = torch.from_numpy(np.zeros(0, np_dtype)).dtype
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (2, *dims[1:]))).to(dtype)
    why = None
    try:
        with torch.no_grad():
            both, first = net(x), net(x[:1])
        both = [both] if isinstance(both, torch.Tensor) else list(both)
        first = [first] if isinstance(first, torch.Tensor) else list(first)
        if any(b.shape[:1] != (2,) or not torch.allclose(b[:1], f, rtol=1e-3, atol=1e-4)
               for b, f in zip(both, first)):
            why = "its outputs at batch 2 are not the two samples' own"
    except Exception as e:  # noqa: BLE001 — any failure at batch 2 is the same problem
        why = f"{type(e).__name__} at batch 2: {str(e).splitlines()[0][:120]}"
    if why:
        raise NotConvertible(f"{path} runs only at batch 1 ({why}): the ONNX route quantizes "
                             "it as it is; for the PyTorch route, export it with a dynamic "
                             "batch axis")
