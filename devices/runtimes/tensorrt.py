"""TensorRT (10.x API): builds an engine from the ONNX Q/DQ file and runs it on the GPU.

- Integer variants (`w8a8`, `w4a16`: INT4 weight-only block quantization on MatMul/Gemm) and
  `fp32` build a *strongly typed* network: precisions come from the ONNX (Q/DQ and tensor
  types), not from builder flags. TensorRT 10 deprecated and 11 removed implicit INT8
  calibration, so there is no INT8 flag path here.
- `fp16` builds a weakly typed network with `BuilderFlag.FP16` from the FP32 ONNX (the
  baseline the integer variants are compared with), unless the ONNX is already FP16.
- Engines are cached under `protocol["engine_cache"]` (default `$HILQ_CACHE/trt-engines`, else
  `~/.cache/hilq/trt-engines`) by `engine_cache_key`: ONNX sha256 + TensorRT version + GPU +
  compute capability + builder settings. An engine is only valid for that exact combination.
- Shapes: only the batch (axis 0) may be dynamic in the ONNX; the optimization profile pins
  it to the protocol's batch (min = opt = max, a static engine per batch, as the batch
  sweep wants). Every other axis must be static: a sequence-length sweep builds one ONNX per
  length (`hilq bench --seq-len`), so each engine is static too; an ONNX with another dynamic
  axis is refused at build, never given the batch size by mistake.
- Buffers are torch CUDA tensors (`set_tensor_address`), execution is `execute_async_v3` on
  a torch stream; `protocol["cuda_graph"]` captures that call once into a CUDA graph.
- Builder settings and the TensorRT version are recorded in `facts`: defaults changed between
  TensorRT 10 and 11, so numbers from the two are not comparable without them.
- Kernels come from the engine inspector (`ProfilingVerbosity.DETAILED`, JSON): a compute
  layer whose tensors are INT8/INT4 is integer, FP32/FP16/BF16 float. Limit: Myelin may fuse
  many ONNX nodes into one foreign node; it is classified as one layer.
- `profile(feeds, iters)`: a second execution context with an `IProfiler` subclass
  (`report_layer_time`) attached, `iters` runs after a warm-up; layer names (`/a/Conv + /a/Relu`,
  `PWN(...)`, `{ForeignNode[/x.../y]}`) are split into ONNX node names for `sources`
  (`layer_sources`), reformatting layers have none; op and tactic come from the inspector.

Written against TensorRT 10's documented Python API; not run on the machines hilq was
developed on (no TensorRT wheel there), see tests/test_runtimes.py for what is tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from . import Consumes, Option, Session, options

COMPUTE = re.compile(r"convolution|conv|matrixmultiply|matmul|gemm|fullyconnected", re.I)
INTEGER = re.compile(r"int8|int4", re.I)
FLOAT = re.compile(r"fp32|fp16|half|float|bf16", re.I)


def version() -> str:
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise ImportError(f"tensorrt {trt.__version__} is installed but torch sees no CUDA GPU")
    return trt.__version__


CONSUMES = Consumes(format="onnx-qdq", target="tensorrt", activations="int8", device="cuda")
OPTIONS = {
    "fp16_rest": Option(bool, False, "integer variants built weakly typed with the FP16 flag: "
                                     "layers left FP32 by the Q/DQ file may run in FP16"),
    "workspace_mb": Option(int, 4096, "builder workspace memory pool (MiB)"),
    "optimization_level": Option(int, 3, "builder optimization level (0-5)",
                                 (0, 1, 2, 3, 4, 5)),
    "cuda_graph": Option(bool, False, "replay each inference from a captured CUDA graph"),
    "engine_cache": Option(str, "", "engine cache folder (default $HILQ_CACHE/trt-engines)"),
}


def precisions() -> dict[str, list[str]]:
    return {"conv": ["fp32", "fp16", "w8a8"], "linear": ["fp32", "fp16", "w8a8", "w4a16"]}


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu: str, capability: str,
                     settings: dict) -> str:
    """Name of a cached engine: any change of file, TensorRT, GPU or builder settings is a
    different engine."""
    blob = json.dumps({"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu,
                       "sm": capability, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def builder_settings(variant: str, protocol: dict, onnx_is_fp16: bool = False) -> dict:
    """The settings the engine is built with (all of them go into the cache key and facts).
    `fp16_rest` (runtime option): build an integer variant weakly typed with the INT8 and FP16
    flags, so layers the Q/DQ file leaves in FP32 may run in FP16 (TensorRT's choice)."""
    opts = options(protocol, OPTIONS)
    weak = variant == "fp16" and not onnx_is_fp16 or \
        opts["fp16_rest"] and variant not in ("fp32", "fp16")
    return {"strongly_typed": not weak, "fp16_flag": weak,
            "int8_flag": weak and variant not in ("fp32", "fp16"),
            "workspace_mb": opts["workspace_mb"],
            "optimization_level": opts["optimization_level"],
            "batch": int(protocol.get("batch", 1)),
            "input_shapes": protocol.get("input_shapes") or {}}


def classify_layers(info: dict) -> dict:
    """Engine-inspector JSON -> {"integer", "float", "unverified"} compute-layer names."""
    out = {"integer": [], "float": [], "unverified": []}
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # inspector without DETAILED verbosity: names only
            if COMPUTE.search(layer):
                out["unverified"].append(layer)
            continue
        name, ltype = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
        if not (COMPUTE.search(ltype) or COMPUTE.search(name)) or "reformat" in ltype.lower():
            continue
        formats = " ".join(str(t.get("Format/Datatype", "")) for key in ("Inputs", "Outputs")
                           for t in layer.get(key, []) if isinstance(t, dict))
        if INTEGER.search(formats):
            out["integer"].append(name)
        elif FLOAT.search(formats):
            out["float"].append(name)
        else:
            out["unverified"].append(name)
    return out


_SPLIT = re.compile(r" \+ |, |\.\.\.|[(){}\[\]]")


def layer_sources(name: str, names) -> list[str]:
    """ONNX node names in a TensorRT layer name (`names`: an `OnnxNames`, or None: the name's
    parts unverified)."""
    from . import unique

    if name.lower().startswith("reformatting"):
        return []
    parts = [p.strip() for p in _SPLIT.split(name)]
    parts = [p for p in parts if p and p not in ("PWN", "ForeignNode")]
    if names is None:
        return unique(parts)
    return unique(s for p in parts for s in names.resolve(p))


def _layer_profiler(trt):
    class LayerTimes(trt.IProfiler):
        """Sums TensorRT's per-layer times (ms) over the runs it is attached to."""

        def __init__(self):
            trt.IProfiler.__init__(self)
            self.ms: dict[str, float] = {}

        def report_layer_time(self, layer_name, ms):
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + float(ms)

    return LayerTimes()


def _cache_dir(protocol: dict) -> Path:
    if cache := options(protocol, OPTIONS)["engine_cache"]:
        return Path(cache)
    base = os.environ.get("HILQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hilq")
    return Path(base) / "trt-engines"


def static_shape(name: str, dims: tuple, batch: int, input_shapes: dict | None = None) -> tuple:
    """An input's shape for the profile and the context: the batch at a dynamic axis 0, the
    manifest's `input_shapes` at other dynamic axes (`runtimes.static_shape`); one nobody
    sized is an error, not given the batch size."""
    from . import static_shape as fixed

    try:
        return fixed(name, [d if d >= 0 else None for d in dims],
                     {"input_shapes": input_shapes or {}}, batch)
    except ValueError as e:
        raise RuntimeError(f"TensorRT: {e}") from None


def _build(trt, logger, path: str, settings: dict) -> bytes:
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) \
        if settings["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        if "MatMulNBits" in errors:
            errors += (" (MatMulNBits is an ONNX Runtime contrib op: TensorRT's INT4 weight-only"
                       " path needs DequantizeLinear with INT4 weights and block_size, opset 21)")
        raise RuntimeError(f"TensorRT could not parse {path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mb"] << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = settings["optimization_level"]
    if settings["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if settings["int8_flag"]:  # explicit Q/DQ in a weakly typed network
        config.set_flag(trt.BuilderFlag.INT8)
    dynamic = [network.get_input(i) for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for t in dynamic:
            shape = static_shape(t.name, tuple(t.shape), settings["batch"],
                                 settings["input_shapes"])
            profile.set_shape(t.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log on stderr)")
    return bytes(serialized)


def _engine_blob(trt, logger, path: str, settings: dict, engine_path: Path
                 ) -> tuple[bytes, bool, float]:
    """(serialized engine, read from the cache?, seconds to build or read it): the cached
    engine, else one built now and written to the cache (atomically)."""
    t0 = time.perf_counter()
    if engine_path.is_file():
        blob, cached = engine_path.read_bytes(), True
    else:
        blob, cached = _build(trt, logger, path, settings), False
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = engine_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, engine_path)
    return blob, cached, time.perf_counter() - t0


def _torch_dtypes(trt, torch) -> dict:
    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16, trt.DataType.INT8: torch.int8,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
            trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}


def _check(ok) -> None:
    if not ok:
        raise RuntimeError("TensorRT execute_async_v3 failed")


class TensorRTSession(Session):
    """A TensorRT engine (cached or built), one execution context with torch CUDA buffers
    bound to every input and output, run on a torch stream (optionally replayed from a
    captured CUDA graph)."""

    def __init__(self, path: str, protocol: dict):
        import tensorrt as trt
        import torch

        from . import CudaEventTimer

        version()
        self.path, self.trt, self.torch = path, trt, torch
        self._engine(path, protocol)
        self.context = self.engine.create_execution_context()
        self._bind(torch)
        self.stream = torch.cuda.Stream()
        _check(self.context.execute_async_v3(self.stream.cuda_stream))  # before any capture
        self.stream.synchronize()
        self.graph = None
        if options(protocol, OPTIONS)["cuda_graph"]:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream,
                                  capture_error_mode="thread_local"):
                self.context.execute_async_v3(self.stream.cuda_stream)
        self.warmup = max(1, int(protocol.get("warmup_iters", 10)))
        self.facts = {**self.facts, "cuda_graph": bool(self.graph),
                      "engine_cache": str(self.engine_path), "engine_cached": self.cached,
                      "build_or_read_s": round(self.build_s, 3)}
        # the engine's own figure: device memory its execution context needs (activations)
        self.need = getattr(self.engine, "device_memory_size_v2", None) or \
            self.engine.device_memory_size
        self.device_timer = CudaEventTimer(self.stream)

    def _engine(self, path: str, protocol: dict) -> None:
        """The builder settings, the engine (from the cache or built) and the facts so far."""
        import torch

        from . import check_variant, read_manifest, sha256_file

        trt = self.trt
        manifest = read_manifest(path)
        variant = manifest.get("variant") or protocol.get("variant") or "fp32"
        check_variant("tensorrt", variant, precisions())
        onnx_is_fp16 = manifest.get("settings", {}).get("float_dtype") == "float16"
        self.settings = builder_settings(variant, {"input_shapes": manifest.get("input_shapes"),
                                                   **protocol}, onnx_is_fp16)
        props = torch.cuda.get_device_properties(0)
        capability = f"{props.major}.{props.minor}"
        key = engine_cache_key(sha256_file(path), trt.__version__, props.name, capability,
                               self.settings)
        self.engine_path = _cache_dir(protocol) / f"{key}.engine"
        logger = trt.Logger(trt.Logger.WARNING)
        blob, self.cached, self.build_s = _engine_blob(trt, logger, path, self.settings,
                                                       self.engine_path)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.engine_path}")
        self.facts = {"engine": "tensorrt", "version": trt.__version__, "gpu": props.name,
                      "capability": capability, "variant": variant, "builder": self.settings}

    def _bind(self, torch) -> None:
        """Input shapes set on the context, a torch CUDA buffer per input and output, and
        every buffer's address given to the context."""
        engine, trt, context = self.engine, self.trt, self.context
        torch_dtype = _torch_dtypes(trt, torch)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.out_names = [n for n in names if n not in self.in_names]
        self.buffers, self.inputs = {}, []
        for n in self.in_names:
            shape = static_shape(n, tuple(engine.get_tensor_shape(n)), self.settings["batch"],
                                 self.settings["input_shapes"])
            context.set_input_shape(n, shape)
            dt = torch_dtype[engine.get_tensor_dtype(n)]
            self.buffers[n] = torch.empty(shape, dtype=dt, device="cuda")
            self.inputs.append((n, shape, str(dt).replace("torch.", "")))
        for n in self.out_names:
            shape = tuple(context.get_tensor_shape(n))
            self.buffers[n] = torch.empty(shape, dtype=torch_dtype[engine.get_tensor_dtype(n)],
                                          device="cuda")
        for n, t in self.buffers.items():
            context.set_tensor_address(n, t.data_ptr())

    def run(self, feeds: dict) -> list[np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            for n in self.in_names:
                self.buffers[n].copy_(torch.from_numpy(np.ascontiguousarray(feeds[n])),
                                      non_blocking=False)
            if self.graph is not None:
                self.graph.replay()
            elif not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            outs = [self.buffers[n].float().cpu().numpy() for n in self.out_names]
        self.stream.synchronize()
        return outs

    def _inspect(self) -> dict:
        inspector = self.engine.create_engine_inspector()
        return json.loads(inspector.get_engine_information(
            self.trt.LayerInformationFormat.JSON))

    def kernels(self) -> dict:
        return classify_layers(self._inspect())

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        """A second execution context (the timed one, and its CUDA graph, stay unprofiled)
        with an IProfiler; warm-up runs happen before it is attached."""
        from . import OnnxNames

        torch = self.torch
        pctx = self.engine.create_execution_context()
        for n, shape, _ in self.inputs:
            pctx.set_input_shape(n, shape)
        for n, t in self.buffers.items():
            pctx.set_tensor_address(n, t.data_ptr())
        with torch.cuda.stream(self.stream):
            for n in self.in_names:
                self.buffers[n].copy_(torch.from_numpy(np.ascontiguousarray(feeds[n])))
        self.stream.synchronize()
        for k in range(self.warmup + iters):
            if k == self.warmup:
                pctx.profiler = times = _layer_profiler(self.trt)
            _check(pctx.execute_async_v3(self.stream.cuda_stream))
            self.stream.synchronize()
        info = self._inspect()
        detail = {str(x.get("Name")): x for x in info.get("Layers", []) if isinstance(x, dict)}
        try:
            names = OnnxNames.of(self.path)
        except Exception:  # noqa: BLE001 — an unreadable graph only costs the mapping
            names = None
        return [{"name": name, "op": detail.get(name, {}).get("LayerType"),
                 "ms": ms / iters, "sources": layer_sources(name, names),
                 "exec": detail.get(name, {}).get("TacticName")}
                for name, ms in times.ms.items()]

    def memory(self) -> dict:
        return {"trt_context_device_mb": round(self.need / 2**20, 2)}


def load(path: str, protocol: dict) -> TensorRTSession:
    return TensorRTSession(path, protocol)
