"""torch -> ONNX: the BN-folded float model traced with `torch.onnx.export` (the TorchScript
exporter, `dynamo=False`: it still works in torch 2.13 and keeps parameter names, which is
how ONNX nodes are mapped back to hilq layers), then the Q/DQ rewrite (`quant.qdq`) with the
scales and zero-points the `QuantLayer`s hold.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .qdq import COMPUTE, insert_qdq
from .spec import ExportError
from .transform import QuantLayer, _set_module, fold_bn, has_batchnorm, quant_layers


def _float_copy(model: nn.Module) -> tuple[nn.Module, dict[str, QuantLayer]]:
    """The float model to trace (QuantLayers replaced by their inner, BN-folded layers) and
    the QuantLayers by name, whose qparams the Q/DQ nodes take."""
    model = copy.deepcopy(model).eval()
    qlayers = quant_layers(model)
    if not qlayers and has_batchnorm(model):
        model = fold_bn(model)
    for name, q in qlayers.items():
        if q.act_spec is not None and (q.act_spec.dynamic or q.act_scale is None):
            raise ExportError(f"layer {name}: activation qparams are not static and calibrated "
                              "(dynamic or never frozen); Q/DQ export needs static scales")
        _set_module(model, name, q.layer)
    if qlayers and has_batchnorm(model):
        raise ExportError("the quantized model still has BatchNorm layers: quantize a BN-folded "
                          "model (quant.transform.quantize folds by default)")
    return model, qlayers


def float_model(model: nn.Module) -> nn.Module:
    """The float model a quantized model's ONNX graph is traced from (QuantLayers unwrapped):
    the FP32 baseline with exactly the same folded weights."""
    return _float_copy(model)[0]


def _to_onnx(model: nn.Module, sample: torch.Tensor, opset: int):
    import onnx

    with torch.no_grad():
        out = model(sample)
    n_out = 1 if isinstance(out, torch.Tensor) else len(out)
    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (sample,), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return proto


def map_layers(graph, inits: dict, fmodel: nn.Module) -> dict[str, str]:
    """ONNX Conv/Gemm/MatMul node name -> hilq layer name: by parameter name (`fc.weight`),
    else by exact weight values (the exporter renames or transposes some initializers)."""
    params = {n: m.weight.detach().numpy() for n, m in fmodel.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    out: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in COMPUTE or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        name = node.input[1][: -len(".weight")] if node.input[1].endswith(".weight") else None
        if name not in params:
            taken = set(out.values())
            name = next((n for n, p in params.items() if n not in taken and (
                (p.shape == w.shape and np.array_equal(p, w))
                or (p.ndim == 2 and p.T.shape == w.shape and np.array_equal(p.T, w)))), None)
        if name is not None:
            out[node.name] = name
    return out


def calibrate(proto, tensors: list[str], calib_x: torch.Tensor | None
              ) -> dict[str, tuple[float, float]]:
    """Min-max of float-graph tensors over the calibration data (ORT's own calibration)."""
    if not tensors:
        return {}
    if calib_x is None:
        raise ExportError("calibration data needed for tensors outside hilq's quantized layers "
                          f"(e.g. {tensors[0]}): pass calib_x")
    from .onnx_run import minmax

    return minmax(proto, tensors, calib_x.detach().numpy())


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
                act_dtype: str = "uint8", opset: int = 17, calib_x: torch.Tensor | None = None,
                input_dtype: torch.dtype = torch.float32, placement: str | None = None) -> dict:
    """Write `model` (a hilq-quantized model, or a float one) as ONNX at `path`.

    `input_shape` is one sample's shape, without the batch (the batch axis is dynamic).
    `act_dtype`: `uint8` (asymmetric, for x86 CPU engines: S8×S8 is slower than FP32 in
    ORT on x86) or `int8` (TensorRT). `placement` (default: `tensorrt` for int8, else `ort`)
    says where Q/DQ go: `ort` = ORT's full QDQ form (integer units end to end), `tensorrt` =
    only where hilq quantizes (each quantized layer's input and weights, float bias), the
    placement NVIDIA's toolkits export, which TensorRT fuses (Conv+ReLU+Q, residual adds)
    itself. `calib_x` calibrates the tensors hilq does not quantize
    itself (see the module docstring). A float model is written without Q/DQ.
    Returns the export facts for the manifest (input/output names, layer map, ...)."""
    import onnx

    fmodel, qlayers = _float_copy(model)
    sample = (calib_x[:1].to(input_dtype) if calib_x is not None
              else torch.zeros((1, *input_shape), dtype=input_dtype))
    proto = _to_onnx(fmodel, sample, opset)
    info = {"opset": opset, "quantized": bool(qlayers)}
    if qlayers:
        placement = placement or ("tensorrt" if act_dtype == "int8" else "ort")
        info.update(insert_qdq(
            proto, qlayers, act_dtype=act_dtype, placement=placement,
            layer_of=map_layers(proto.graph, _initializers(proto), fmodel),
            ranges_of=lambda tensors: calibrate(proto, tensors, calib_x)))
    else:
        info["layer_map"] = {n: {"layer": lay, "op": next(x.op_type for x in proto.graph.node
                                                          if x.name == n),
                                 "precision": "fp32", "kernel": "float"}
                             for n, lay in map_layers(proto.graph, _initializers(proto), fmodel).items()}
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)     # a reader never sees half a file
    info["input_name"] = proto.graph.input[0].name
    info["output_names"] = [o.name for o in proto.graph.output]
    return info


def _initializers(proto) -> dict:
    import onnx

    return {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
