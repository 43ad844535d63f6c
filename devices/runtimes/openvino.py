"""OpenVINO CPU plugin: compiles the same ONNX files (FP32, Q/DQ, MatMulNBits) that ONNX
Runtime runs.

Settings from the protocol: `threads` -> INFERENCE_NUM_THREADS, `mode` ("latency" |
"throughput", or `ov_hint`) -> PERFORMANCE_HINT. INFERENCE_PRECISION_HINT is pinned to f32:
on AVX-512-BF16/AMX CPUs OpenVINO would otherwise run the float parts in bf16, and an "fp32"
number would silently be a bf16 one. Kernels are read from the compiled runtime model: each
node's `layerType` and `runtimePrecision` (i8/u8 = integer kernel) as the CPU plugin chose them.

`profile(feeds, iters)` compiles the model a second time with `PERF_COUNT` (only that copy
is profiled) and sums `get_profiling_info()` (real_time) over `iters` inferences after a
warm-up; NOT_RUN nodes (fused into another) are left out. Sources: the runtime model op's
`originalLayersNames` (its friendly name = the profiling node_name), each resolved to an ONNX
node (OpenVINO adds `/WithoutBiases`-style suffixes and may name an op after its output
tensor, e.g. the Gemm producing `output`); reorders have none.
"""

from __future__ import annotations

import numpy as np

from . import Consumes, Option, Session, options

COMPUTE = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
           "Gemm", "FullyConnectedCompressed")
INTEGER = ("i8", "u8", "i4", "u4")


def version() -> str:
    import openvino

    return openvino.get_version()


CONSUMES = Consumes(format="onnx-qdq", target="cpu", activations="uint8")
OPTIONS = {
    "hint": Option(str, "", "PERFORMANCE_HINT (default: the protocol's mode)",
                   ("", "latency", "throughput", "cumulative_throughput")),
    "num_streams": Option(int, 0, "NUM_STREAMS (0: the hint decides)"),
}


def precisions() -> dict[str, list[str]]:
    # w4a16: ONNX Runtime's MatMulNBits, which OpenVINO reads as a FullyConnected with u4
    # compressed weights (decompressed in the kernel; activations stay f32)
    return {"conv": ["fp32", "w8a8"], "linear": ["fp32", "w8a8", "w4a16"]}


def kernels_of(runtime_model) -> dict:
    """{"integer": [...], "float": [...], "detail": [...]} for the compute layers (conv,
    matmul) of a compiled model's runtime graph. Names are OpenVINO friendly names; `detail`
    keeps the original ONNX layer names and the primitive (e.g. `jit_avx2_I8`)."""
    out = {"integer": [], "float": [], "detail": []}
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        get = lambda k, info=info: info[k].astype(str) if k in info else ""  # noqa: E731
        ltype = get("layerType")
        if ltype not in COMPUTE:
            continue
        prec = get("runtimePrecision").lower()
        name = op.get_friendly_name()
        out["integer" if prec in INTEGER else "float"].append(name)
        out["detail"].append({"layer": name, "type": ltype, "precision": prec,
                              "primitive": get("primitiveType"),
                              "original": get("originalLayersNames")})
    return out


def _text(value) -> str:
    """A property as text: OpenVINO types print as `<Type: 'float32'>`; use their name."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)


def _static_inputs(model, path: str, protocol: dict) -> list[tuple[str, tuple, str]]:
    """(name, static shape, numpy dtype) of the model's inputs; a model with dynamic inputs
    is reshaped to those shapes (the CPU plugin picks better kernels for static shapes)."""
    from . import read_manifest, static_shape

    batch = int(protocol.get("batch", 1))
    manifest = read_manifest(path)
    shapes, inputs = {}, []
    for port in model.inputs:
        name = port.get_any_name()
        dims = static_shape(name, [None if d.is_dynamic else d.get_length()
                                   for d in port.get_partial_shape()], manifest, batch)
        shapes[name] = list(dims)
        inputs.append((name, dims, np.dtype(port.get_element_type().to_dtype()).name))
    if any(port.get_partial_shape().is_dynamic for port in model.inputs):
        model.reshape(shapes)  # static shapes: the CPU plugin picks better kernels
    return inputs


def compile_config(protocol: dict, opts: dict) -> dict:
    """The CPU plugin's compile settings from the protocol and the runtime options."""
    hint = str(opts["hint"] or protocol.get("mode") or "latency").upper()
    if hint not in ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"):
        raise ValueError(f"openvino performance hint must be latency or throughput, not {hint!r}")
    # DYNAMIC_QUANTIZATION_GROUP_SIZE 0: on AVX-512/VNNI CPUs the plugin otherwise quantizes
    # the activations of compressed-weight (w4a16) matmuls to int8 on the fly, which is not
    # the variant asked for (a16) and differs from ONNX Runtime by ~1%
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32",
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    threads = int(protocol.get("threads", 0))
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if opts["num_streams"]:
        config["NUM_STREAMS"] = opts["num_streams"]
    return config


class OpenVinoSession(Session):
    """The model compiled for the CPU plugin and one infer request, timed by the agent."""

    def __init__(self, path: str, protocol: dict):
        import openvino as ov

        from . import check_variant, manifest_variant

        variant = manifest_variant(path, protocol)
        check_variant("openvino", variant, precisions(), mixes=True)
        self.path = path
        self.core = ov.Core()
        self.model = self.core.read_model(path)
        self.inputs = _static_inputs(self.model, path, protocol)
        opts = options(protocol, OPTIONS)
        self.config = compile_config(protocol, opts)
        self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.n_out = len(self.compiled.outputs)
        used = {k: _text(self.compiled.get_property(k)) for k in
                ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS",
                 "INFERENCE_PRECISION_HINT", "ENABLE_CPU_PINNING")}
        self.facts = {"engine": "openvino", "version": ov.get_version(), "device": "CPU",
                      "cpu": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
                      "variant": variant,
                      "requested": {k: str(v) for k, v in self.config.items()},
                      "compiled": used, "options": opts}
        self.warmup = max(1, int(protocol.get("warmup_iters", 10)))

    def run(self, feeds: dict) -> list[np.ndarray]:
        self.request.infer(feeds)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_out)]

    def kernels(self) -> dict:
        return kernels_of(self.compiled.get_runtime_model())

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        """A second compiled model with PERF_COUNT (the timed one stays unprofiled)."""
        pcompiled = self.core.compile_model(self.model, "CPU", {**self.config, "PERF_COUNT": True})
        preq = pcompiled.create_infer_request()
        for _ in range(self.warmup):
            preq.infer(feeds)
        totals: dict[str, list] = {}
        for _ in range(iters):
            preq.infer(feeds)
            for info in preq.get_profiling_info():
                if info.status != info.Status.EXECUTED:
                    continue
                rec = totals.setdefault(info.node_name, [info, 0.0])
                rec[1] += info.real_time.total_seconds() * 1000.0
        return profile_records(pcompiled.get_runtime_model(), totals, iters,
                               _onnx_names(self.path))


def load(path: str, protocol: dict) -> OpenVinoSession:
    return OpenVinoSession(path, protocol)


def _onnx_names(path: str):
    from . import OnnxNames

    try:
        return OnnxNames.of(path)
    except Exception:  # noqa: BLE001 — an unreadable graph (not ONNX) only costs the mapping
        return None


def profile_records(runtime_model, totals: dict, iters: int, names) -> list[dict]:
    """Node records (see runtimes/__init__.py) from summed ProfilingInfo: node_name ->
    [info, total ms]; sources from the runtime model's `originalLayersNames`."""
    from . import unique

    original = {}
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" in info:
            original[op.get_friendly_name()] = [
                n for n in info["originalLayersNames"].astype(str).split(",") if n]
    out = []
    for name, (info, ms) in totals.items():
        layers = original.get(name, [name])
        sources = unique(s for n in layers for s in (names.resolve(n) if names else [n]))
        out.append({"name": name, "op": info.node_type, "ms": ms / iters, "sources": sources,
                    "exec": info.exec_type})
    return out
