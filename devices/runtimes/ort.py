"""ONNX Runtime: runs the ONNX (FP32 or Q/DQ) artifact on the CPU (or a listed provider).

Which layers ran in integer arithmetic is read from the engine, not assumed: at load, ORT
writes the graph it actually optimized (`optimized_model_filepath`); `kernels()` lists its
integer compute nodes (QLinearConv, QGemm, MatMulIntegerToFloat, MatMulNBits, ...) and the
float ones (Conv, FusedConv, NCHWc Conv, Gemm, MatMul, ...). Without the `onnx` package it
falls back to one profiled run in a separate session, whose node events name the kernels.

`profile(feeds, iters)` (a profiled agent run) opens a second session with the same options
plus `enable_profiling`, lazily, runs warm-up + `iters` inferences and keeps the
`<node>_kernel_time` events of the last `iters` runs (those inside their `model_run` events).
ORT's optimized node names map back to ONNX nodes as: `<onnx node>_token_<k>` (a node
replaced by a fusion, e.g. QLinearConv from a Q/DQ pattern; `/duplicated` for a DQ copied
per consumer) -> that node; `<tensor>_nchwc` (NCHWc conv, named after its output: the conv's,
or the fused Relu's) -> the tensor's producer and the ops fused into it; `Transpose`,
`ReorderInput/ReorderOutput`, and Q/DQ nodes ORT inserted (named just `QuantizeLinear`,
`DequantizeLinear`) -> [].
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import weakref

import numpy as np

from . import Consumes, Option, Session, options

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
    so.log_severity_level = 3   # errors only: graph warnings are not the profile's business
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="hilq-ort-prof-"), "p")
    sess = _session(ort, model_path, so, providers)
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


_SUFFIX = re.compile(r"(_token_\d+|/duplicated)$")


def node_sources(name: str, names) -> list[str]:
    """ONNX node names an ORT optimized-graph node covers (see the module docstring);
    `names` is an `OnnxNames` of the original file, or None (no onnx package: the name with
    ORT's suffixes stripped, unverified)."""
    base = name[len("fused "):] if name.startswith("fused ") else name
    while _SUFFIX.search(base):
        base = _SUFFIX.sub("", base)
    nchwc = base.endswith("_nchwc")
    if nchwc:
        base = base[: -len("_nchwc")]
    if names is None:
        return [] if nchwc or base in ("Transpose", "ReorderInput", "ReorderOutput") else [base]
    if base in names.op:
        return [base]
    if base in names.producer:
        return names.fused_chain(names.producer[base])
    return []


def profile_records(events: list, iters: int, names) -> list[dict]:
    """Node records (see runtimes/__init__.py) from ORT profile events: node kernel events
    inside the last `iters` `model_run` events, averaged per inference."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[-iters:]
    if not runs:
        return []
    t0 = runs[0][0]
    nodes: dict[str, dict] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < t0:
            continue
        name = e["name"][: -len("_kernel_time")]
        rec = nodes.get(name)
        if rec is None:
            rec = nodes[name] = {"name": name, "op": args.get("op_name"), "us": 0.0,
                                 "sources": node_sources(name, names),
                                 "exec": args.get("provider")}
        rec["us"] += float(e["dur"])
    out = []
    for rec in nodes.values():
        us = rec.pop("us")
        out.append({**rec, "ms": us / len(runs) / 1000.0})
    return out


CONSUMES = Consumes(format="onnx-qdq", target="cpu", activations="uint8")
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
OPTIONS = {
    "graph_optimization_level": Option(str, "all", "graph optimizations before the run",
                                       tuple(_LEVELS)),
    "providers": Option(list, ["CPUExecutionProvider"], "execution providers, in order"),
    # x86 without VNNI: ORT's default U8S8 kernels (vpmaddubsw) saturate int16 pair sums;
    # true selects exact (slower) kernels. Off by default, as deployed.
    "x64_quant_precision": Option(bool, False, "exact u8×s8 kernels on x86 without VNNI"),
}


def precisions() -> dict[str, list[str]]:
    return {"conv": ["fp32", "w8a8"], "linear": ["fp32", "w8a8", "w4a16", "w8a16"]}


def _options(ort, protocol: dict):
    """Session options from the protocol (the timed session and the profiling one alike)."""
    opts = options(protocol, OPTIONS)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(protocol.get("threads", 0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                          _LEVELS[opts["graph_optimization_level"]])
    so.log_severity_level = 3   # the "hardware-specific optimized model" notice is expected
    so.add_session_config_entry("session.x64quantprecision",
                                "1" if opts["x64_quant_precision"] else "0")
    return so


# ORT's WeightBiasQuantization (1.21+) re-quantizes a float Conv/Gemm that sits between a
# DequantizeLinear and a QuantizeLinear: a layer the bit config left float would silently
# run as QLinearConv. hilq decides each layer's precision; the engine must not.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def _session(ort, path, so, providers):
    return ort.InferenceSession(path, so, providers=providers,
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def _input_specs(sess, path: str, protocol: dict) -> list[tuple[str, tuple, str]]:
    """(name, static shape, numpy dtype) of the session's inputs: dynamic axes take the
    protocol's batch (axis 0) or the manifest's shapes (`runtimes.static_shape`)."""
    from . import read_manifest, static_shape

    batch = int(protocol.get("batch", 1))
    manifest = read_manifest(path)
    inputs = []
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else None for d in i.shape]
        inputs.append((i.name, static_shape(i.name, dims, manifest, batch),
                       _DTYPES.get(i.type, "float32")))
    return inputs


class OrtSession(Session):
    """The timed ONNX Runtime session; the optimized graph ORT saved at load (what
    `kernels()` reads) lives in a scratch folder removed on `close()`, when the session is
    dropped, or at exit."""

    def __init__(self, path: str, protocol: dict):
        import onnxruntime as ort

        self.path, self.protocol = path, protocol
        so = _options(ort, protocol)
        opts = options(protocol, OPTIONS)
        self.providers = opts["providers"]
        self.tmp = tempfile.mkdtemp(prefix="hilq-ort-", dir=protocol.get("scratch_dir"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.tmp, True)
        self.optimized = os.path.join(self.tmp, "optimized.onnx")
        self.sess = self._open(ort, so)
        self.inputs = _input_specs(self.sess, path, protocol)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.facts = {"engine": "onnxruntime", "version": ort.__version__,
                      "providers": self.sess.get_providers(),
                      "intra_op_threads": int(protocol.get("threads", 0)),
                      "graph_optimization_level": _LEVELS[opts["graph_optimization_level"]],
                      "x64_quant_precision": opts["x64_quant_precision"], "options": opts,
                      "disabled_optimizers": DISABLED_OPTIMIZERS}
        self.warmup = max(1, int(protocol.get("warmup_iters", 10)))

    def _open(self, ort, so):
        so.optimized_model_filepath = self.optimized
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "optimized.onnx.data")   # large models: weights beside it
        try:
            return _session(ort, self.path, so, self.providers)
        except Exception:
            # EPs that compile subgraphs (TensorRT, OpenVINO EP) cannot save the optimized
            # model: open it without, and let kernels() profile instead
            so.optimized_model_filepath = ""
            try:
                return _session(ort, self.path, so, self.providers)
            except Exception:
                self._cleanup()
                raise

    def run(self, feeds: dict) -> list[np.ndarray]:
        return self.sess.run(self.names, feeds)

    def kernels(self) -> dict:
        if os.path.isfile(self.optimized):
            try:
                return classify(_optimized_ops(self.optimized))
            except ImportError:   # no onnx package on this device
                pass
        return classify(_profiled_ops(self.path, self.providers, self.inputs))

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        """A second session with the same options and the profiler on (never the timed one);
        its warm-up runs are left out of the records."""
        import onnxruntime as ort

        from . import OnnxNames

        pso = _options(ort, self.protocol)
        pso.enable_profiling = True
        pdir = tempfile.mkdtemp(prefix="prof-", dir=self.tmp)
        pso.profile_file_prefix = os.path.join(pdir, "ort")
        psess = _session(ort, self.path, pso, self.sess.get_providers())
        for _ in range(self.warmup + iters):
            psess.run(self.names, feeds)
        prof = psess.end_profiling()
        try:
            with open(prof) as f:
                events = json.load(f)
        finally:
            shutil.rmtree(pdir, ignore_errors=True)
        try:
            onnx_names = OnnxNames.of(self.path)
        except Exception:  # noqa: BLE001 — an unreadable graph only costs the mapping
            onnx_names = None
        return profile_records(events, iters, onnx_names)

    def close(self) -> None:
        self._cleanup()


def load(path: str, protocol: dict) -> OrtSession:
    return OrtSession(path, protocol)
