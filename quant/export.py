"""The build verb: a model (a name, a factory, an ONNX file) and a variant -> an `Artifact`
the device runs, with its manifest, reference outputs and evaluation set.

`build_artifact` picks the route: the PyTorch one (fake-quant model, `quant.onnx_export`
and the Q/DQ rewrite `quant.qdq`), a user's ONNX file (`quant.onnx_artifact`: the file
itself for FP32, its graph or onnx2torch for integer variants) or `torch.export`
(`quant.export_torch`); `quant.assembly` holds what they share.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from torch import nn

from .artifact import Artifact, sha256_file
from .assembly import (
    EXPORT_VERSION,
    FORMAT_FP32,
    FORMAT_QDQ,
    cache_path,
    cached,
    evaluation_fields,
    ort_deviation,
    reference,
    target_config,
    versions,
)
from .onnx_export import export_onnx, float_model
from .options import TARGETS, ExportOptions
from .spec import DISTILL_ITERS, BitConfig, ExportError, parse_variant
from .transform import fold_bn
from .zeroq import weights_sha256

__all__ = ["DISTILL_ITERS", "TARGETS", "ExportError", "ExportOptions", "build_artifact",
           "export_onnx", "float_model", "target_config"]



def _quantized(entry, net: nn.Module, config: BitConfig, repairs, seed: int,
               calib_data: str = "real", distill: dict | None = None):
    """The fake-quant model for `config` through the shared pipeline (repairs included)."""
    from .pipeline import quantize_model

    distill = distill or {}
    return quantize_model(entry, config, repairs=tuple(repairs), seed=seed, model=net,
                          calib_data=calib_data,
                          distill_iters=distill.get("iters", DISTILL_ITERS),
                          distill_objective=distill.get("objective", "batch"))


def _source_digests(entry, ref, net: nn.Module) -> dict:
    """The content of the user's files in the cache key, not only their paths: an ONNX file
    re-exported with other activations but the same weights (EfficientNet-Lite's ReLU6 vs
    Swish), a factory whose modules changed, or an image folder whose photos changed, must
    not reuse a stale artifact."""
    out = {}
    if net is not None:
        modules = [(n, type(m).__module__, type(m).__qualname__) for n, m in net.named_modules()]
        out["modules_sha256"] = hashlib.sha256(repr(modules).encode()).hexdigest()
    if entry.onnx_path:
        out["onnx_sha256"] = sha256_file(Path(entry.onnx_path))
    if getattr(ref, "metric", None):    # the metric's code travels in the evaluation set
        from .evalset import metric_arrays

        source = str(metric_arrays(ref.metric)["metric:source"])
        out["metric_sha256"] = hashlib.sha256(source.encode()).hexdigest()
    data = Path(ref.data) if ref.data else None
    if data is not None and data.is_file():
        out["data_sha256"] = sha256_file(data)
    elif data is not None and data.is_dir():
        files = sorted(q for q in data.rglob("*") if q.is_file())
        out["data_sha256"] = _folder_digest(str(data), tuple(
            (f.relative_to(data).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
            for f in files))
    return out


@functools.lru_cache(maxsize=16)
def _folder_digest(root: str, listing: tuple) -> str:
    """A folder's content hash, once per (name, size, mtime) listing: a search builds dozens
    of artifacts from one photo folder and must not read every photo for each of them."""
    h = hashlib.sha256()
    for rel, _, _ in listing:
        h.update(f"{rel}\0{sha256_file(Path(root) / rel)}\0".encode())
    return h.hexdigest()


def build_artifact(model, variant: str, out_dir: str | Path, target: str = "cpu", *,
                   options: ExportOptions | None = None, **settings) -> Artifact:
    """The build verb: model (a name or `ModelRef`) + variant -> Artifact, as `options`
    (`ExportOptions`; or its fields as keywords, with `target`) say.

    A user's ONNX file is its own fp32 artifact; its integer variants go through PyTorch
    (onnx2torch) or, where the file does not convert or the route is `onnx`, through the
    ONNX graph itself (`quant.onnx_artifact`); the manifest's `settings.route` says which.
    Files are cached in `out_dir` under a hash of everything that decides their content,
    so repeated calls reuse them."""
    o = options or ExportOptions(target=target, **settings)
    if o.target == "torch":
        from .export_torch import build

        return build(model, variant, out_dir, seed=o.seed, device=o.device)
    from .models import ModelRef, load_model

    ref = model if isinstance(model, ModelRef) else ModelRef(model)
    v = parse_variant(variant)
    if v.float_dtype in ("fp16", "bf16") and o.target == "cpu":
        raise ExportError(f"variant {variant} is not an ONNX Q/DQ export for cpu: ONNX Runtime's "
                          "CPU provider has no fp16/bf16 convolutions; use fp32 or target torch")
    settings = {"target": o.target, "calib": o.calib, "granularity": o.granularity,
                "group_size": o.group_size, "repairs": list(o.repairs), "seed": o.seed,
                "act_dtype": "int8" if o.target == "tensorrt" else "uint8",
                "export_version": EXPORT_VERSION}
    entry = load_model(ref)
    if entry.onnx_path:
        from . import onnx_artifact

        art = onnx_artifact.build(entry, ref, v, out_dir, o.target, settings, versions(), o.seed,
                                  cache_key=lambda extra: cache_path(
                                      out_dir, ref.name, variant, o.target, v, {
                                          **settings, **extra, **ref.key(),
                                          **_source_digests(entry, ref, None)}),
                                  route=ref.route if o.route == "auto" else o.route)
        if art is not None:
            return art
    return _torch_route(entry, ref, v, variant, Path(out_dir), o, settings)


def _torch_route(entry, ref, v, variant: str, out_dir: Path, o: ExportOptions,
                 settings: dict) -> Artifact:
    """The fake-quant model through the shared pipeline, exported as Q/DQ ONNX (or the
    cached file built from the same settings and sources)."""
    net = entry.build().eval()
    settings["float_weights_sha256"] = weights_sha256(net)
    if entry.onnx_path:
        settings["route"] = "torch"         # onnx2torch converted the file (quant.onnx_artifact)
    if o.calib_data != "real":
        settings["calib_data"] = o.calib_data
    if o.calib_data == "distilled":
        settings["distill"] = {"iters": o.distill_iters, "objective": o.distill_objective}
    if entry.preprocess:
        settings["preprocess"] = entry.preprocess
    path = cache_path(out_dir, ref.name, variant, o.target, v,
                      {**settings, **ref.key(), **_source_digests(entry, ref, net)})
    if cached(path):
        return Artifact.load(path)
    from .pipeline import variant_bit_config

    notes: list[str] = []
    config = target_config(variant_bit_config(fold_bn(net), variant, granularity=o.granularity,
                                              calib=o.calib, group_size=o.group_size,
                                              notes=notes), o.target)
    data = entry.data()
    if config.layers:
        res = _quantized(entry, net, config, o.repairs, o.seed, o.calib_data,
                         settings.get("distill", {}))
        qmodel, calib_x = res.qmodel, res.calib_x
    else:
        qmodel, calib_x = fold_bn(net), data.calib_x if data.calib_x is not None else data.test_x
    settings["notes"] = notes
    return _write(entry, data, ref, v, variant, path, net, qmodel, calib_x, config, settings, o)


def _write(entry, data, ref, v, variant: str, path: Path, net, qmodel, calib_x, config,
           settings, o: ExportOptions) -> Artifact:
    """The Q/DQ file, its reference outputs and evaluation set, and the manifest."""
    info = export_onnx(qmodel, entry.input_shape, path, act_dtype=settings["act_dtype"],
                       calib_x=calib_x, input_dtype=calib_x.dtype)
    ref_npz = reference(qmodel, data, path, o.seed)
    evaluation = evaluation_fields(net, qmodel, data, path.parent, info["input_name"],
                                   ref.name, ref.metric, (entry.output_kinds or (None,))[0])
    runtimes = ["ort", "openvino"] + (["tensorrt"] if o.target == "tensorrt" else [])
    settings.update(opset=info["opset"], calib_samples=len(calib_x),
                    placement=info.get("placement"),
                    extra_tensors_calib="minmax (float graph)",
                    folded_activations=info.get("folded_activations", []),
                    qparam_conflicts=info.get("qparam_conflicts", []))
    if v.float_dtype in ("fp16", "bf16"):
        settings["engine_precision"] = v.float_dtype   # a TensorRT builder flag, not in the file
    return Artifact.create(
        path, model=ref.name, variant=variant, target=o.target,
        format=FORMAT_QDQ if config.layers else FORMAT_FP32,
        bit_config=config.to_dict(), input_shape=[1, *entry.input_shape],
        input_dtype=str(calib_x.dtype).replace("torch.", ""), input_name=info["input_name"],
        output_names=info["output_names"], versions=versions(), settings=settings,
        layer_map=info["layer_map"], runtimes=runtimes, reference=ref_npz.name,
        reference_ort_max_abs_diff=ort_deviation(path, ref_npz), **evaluation)
