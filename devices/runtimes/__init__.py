"""Inference engines the on-device agent can time. One small module per engine.

Each module stands alone: it imports only the standard library, numpy and its own engine
(lazily, inside functions), never hilq, because it is copied to the device with the agent.
Every runtime module exposes the same three functions:

- `version() -> str` — the engine's version; raises ImportError when the engine is absent.
- `precisions() -> dict[str, list[str]]` — layer type (`conv`, `linear`) -> variant precisions
  it runs in integer/low-precision kernels (e.g. `["fp32", "w8a8"]`). Asking for anything
  else is an error, never a silent fallback to float.
- `load(path, protocol: dict) -> Session` — compile/open the artifact with the protocol's
  threads and settings.

`Session` is the small class below, one subclass per engine: the agent times `run` and reads
the rest (`inputs`, `facts`, `kernels()`, `profile(...)`, `memory()`, `device_timer`), and
calls `close()` when done.

And two declarations, as plain data the host reads without importing the engine:

- `CONSUMES: Consumes` — the artifact the runtime runs (format, export target, activation
  dtype, the device its tensors live on): `quant.export.build_artifact` builds exactly that.
- `OPTIONS: dict[str, Option]` — the engine settings it takes, with type, default and help;
  set with `--runtime-option key=value` or `runtime_options` in a protocol, checked on the
  host (`check_options`: an unknown key or a bad value is a one-line error) and read by the
  module with `options(protocol, OPTIONS)`.

Profiling (a separate, never-timed agent run: `protocol["profile_iters"]` > 0). A runtime
that can profile overrides `Session.profile(feeds, iters) -> list[dict]`: it runs `iters`
inferences with the engine's own profiler on (in a separate session / compiled model /
execution context, so the timed path stays unprofiled; its own warm-up runs are not counted)
and returns one record per engine node:

    {"name": engine node name, "op": engine op / layer type,
     "ms": mean time per inference in ms (all of that node's events / iters),
     "sources": [original ONNX node names the node covers; several for a fused node,
                 [] when not attributable (reorders, inserted transposes)],
     "exec": exec / primitive / provider string, or None}

`sources` are ONNX node names for ONNX artifacts (ort, openvino, tensorrt), matched against
the file's graph by `OnnxNames` when the `onnx` package is installed (else the engine's
names with its suffixes stripped, unverified), and hilq layer names (module paths of the
conv/linear modules) for `.pt2` programs (torch, torch-cuda). A session that does not
override `profile` (`can_profile` False: the engine has no profiler hilq can read) makes the
agent report `unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NAMES = ("ort", "openvino", "torch", "torch-cuda", "tensorrt")


@dataclass(frozen=True)
class Consumes:
    """The artifact a runtime runs."""

    format: str                # onnx-qdq | torch-pt2
    target: str                # quant.export's target: cpu | tensorrt | torch
    activations: str           # integer activations of its INT8 variants: uint8 | int8 | float
    device: str = "cpu"        # where the artifact's weights live: cpu | cuda


@dataclass(frozen=True)
class Option:
    """One engine setting a runtime takes."""

    type: type                 # bool | int | float | str | list (of str)
    default: Any
    help: str
    choices: tuple = ()


def declaration(runtime: str) -> tuple[Consumes, dict[str, Option]]:
    """(CONSUMES, OPTIONS) of a runtime module; imports the module, never its engine."""
    import importlib

    mod = importlib.import_module(f"{__name__}.{module_name(runtime)}")
    return mod.CONSUMES, mod.OPTIONS


def parse_option(runtime: str, key: str, value, table: dict[str, Option]):
    """A checked value for `key` (a string from the command line, or a config's value)."""
    if key not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"runtime {runtime} has no option {key!r} (its options: {known})")
    opt = table[key]
    try:
        if opt.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = value.lower() in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif opt.type is list:
            value = [v for v in value.split(",") if v] if isinstance(value, str) else list(value)
        else:
            value = opt.type(value)
    except (TypeError, ValueError):
        raise ValueError(f"runtime option {key}={value!r}: expected "
                         f"{opt.type.__name__}") from None
    if opt.choices and value not in opt.choices:
        raise ValueError(f"runtime option {key}={value!r}: use {', '.join(map(str, opt.choices))}")
    return value


def check_options(runtime: str, given: dict) -> dict:
    """`given` checked against the runtime's OPTIONS: the same keys, typed values."""
    table = declaration(runtime)[1]
    return {k: parse_option(runtime, k, v, table) for k, v in (given or {}).items()}


def options(protocol: dict, table: dict[str, Option]) -> dict:
    """Every option of `table`: the protocol's `runtime_options` value, else the default."""
    given = protocol.get("runtime_options") or {}
    return {k: given.get(k, o.default) for k, o in table.items()}


class Session:
    """An artifact ready to run, as one engine opened it. Subclasses set `inputs` and
    `facts` and override `run`; the rest is optional.

    - `inputs`: (name, shape with batch resolved, numpy dtype) of each input.
    - `facts`: engine version, providers, settings used.
    - `device_timer`: GPU: an object with start()/stop() -> ms (device time of one call).
    """

    inputs: list[tuple[str, tuple, str]]
    facts: dict
    device_timer: Any = None

    def run(self, feeds: dict) -> list:
        """One inference; the outputs as numpy arrays. It must not return before the work is
        done (GPU runtimes synchronise)."""
        raise NotImplementedError

    def kernels(self) -> dict | None:
        """{"integer": [...], "float": [...], ...} as the engine ran them; None: unknown."""
        return None

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        """`iters` profiled inferences -> one record per engine node (see above)."""
        raise NotImplementedError

    @property
    def can_profile(self) -> bool:
        return type(self).profile is not Session.profile

    def memory(self) -> dict | None:
        """The engine's own memory figures (MiB); None where it reports none."""
        return None

    def close(self) -> None:
        """Release what the session holds beyond memory (scratch files)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def module_name(runtime: str) -> str:
    """Runtime name as spelt in configs (`torch-cuda`) -> module file name (`torch_cuda`)."""
    if runtime not in NAMES:
        raise ValueError(f"unknown runtime {runtime!r} (use {', '.join(NAMES)})")
    return runtime.replace("-", "_")


class CudaEventTimer:
    """Device time of one call: CUDA events recorded around it on `stream` (the current
    stream if None), copies included; shared by torch-cuda and TensorRT."""

    def __init__(self, stream=None):
        import torch

        self.stream = stream
        self.a = torch.cuda.Event(enable_timing=True)
        self.b = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self.a.record(self.stream)

    def stop(self) -> float:
        self.b.record(self.stream)
        self.b.synchronize()
        return float(self.a.elapsed_time(self.b))


def sha256_file(path: str) -> str:
    """The file's sha256, read in 1 MiB chunks (artifacts, evaluation sets)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str) -> dict:
    """The manifest beside an artifact (`FILE.manifest.json`, quant/artifact.py), {} if none:
    the one place on the device that knows where it lives."""
    import json
    import os

    mpath = path + ".manifest.json"
    if not os.path.isfile(mpath):
        return {}
    with open(mpath) as f:
        return json.load(f)


def static_shape(name: str, dims, manifest: dict, batch: int) -> tuple[int, ...]:
    """An input's shape for the engine, every dynamic dimension (None) fixed: a dynamic axis
    0 is the protocol's batch; any other takes the manifest's `input_shapes` (what the user
    gave as --input-shape); one still unknown is an error naming the input, never a guess."""
    given = (manifest.get("input_shapes") or {}).get(name)
    out = []
    for i, d in enumerate(dims):
        if d is not None:
            out.append(int(d))
        elif i == 0:
            out.append(int(batch))
        elif given is not None and len(given) == len(dims):
            out.append(int(given[i]))
        else:
            raise ValueError(f"input {name} has a dynamic dimension {i} and the artifact's "
                             "manifest gives no shape for it (hilq bench --input-shape "
                             f"{name}=...)")
    return tuple(out)


def manifest_variant(path: str, protocol: dict) -> str:
    """The variant the artifact's manifest claims, else the protocol's; fp32 if neither."""
    return read_manifest(path).get("variant") or protocol.get("variant") or "fp32"


def check_variant(runtime: str, variant: str, precisions: dict[str, list[str]],
                  mixes: bool = False) -> None:
    """Unsupported precision = an error, never a float run under an integer name. Per-layer
    mixes (`config:...`) pass where the runtime verifies each layer through `kernels()`."""
    if mixes and variant.startswith("config:"):
        return
    supported = sorted({p for ps in precisions.values() for p in ps})
    if variant not in supported:
        raise ValueError(f"{runtime} runtime does not run {variant!r} (supported: "
                         f"{', '.join(supported)}); refusing to fall back to float")


# --- profiling helpers shared by the runtime modules ---------------------------------------

# ops an engine fuses into the conv/matmul before them (activation, residual sum, BN)
_FUSIBLE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
            "Add", "Sum", "BatchNormalization", "Mul", "Div", "Sub"}
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "ConvInteger",
            "MatMulInteger", "QLinearConv", "QLinearMatMul"}


class OnnxNames:
    """Node and tensor names of an ONNX file's graph, to map an engine's node names back to
    the original nodes. `OnnxNames.of(path)` is None without the `onnx` package."""

    def __init__(self, graph):
        self.op, self.inputs, self.producer, self.consumers = {}, {}, {}, {}
        for n in graph.node:
            self.op[n.name] = n.op_type
            self.inputs[n.name] = [t for t in n.input if t]
            for t in n.output:
                self.producer[t] = n.name
            for t in n.input:
                self.consumers[t] = self.consumers.get(t, 0) + 1

    @classmethod
    def of(cls, path: str):
        try:
            import onnx
        except ImportError:
            return None
        return cls(onnx.load(path, load_external_data=False).graph)

    def fused_chain(self, node: str) -> list[str]:
        """`node` (the last op of a fusion, e.g. the Relu whose output an engine node is
        named after) and the ops before it up to the conv/matmul they were fused into, conv
        first; just [node] when the chain does not end at a compute op."""
        chain, cur = [node], node
        for _ in range(4):
            if self.op.get(cur) in _COMPUTE:
                return chain[::-1]
            if self.op.get(cur) not in _FUSIBLE:
                break
            prev = [self.producer[t] for t in self.inputs.get(cur, [])
                    if t in self.producer and self.consumers.get(t) == 1]
            prev.sort(key=lambda p: self.op.get(p) not in _COMPUTE)   # a conv input first
            if not prev:
                break
            chain.append(cur := prev[0])
        return [node]

    def resolve(self, name: str) -> list[str]:
        """Original node(s) an engine-side name stands for: the node itself; the producer of
        a tensor of that name (and the ops fused into it); the longest `/`-prefix that is a
        node (OpenVINO's `/fc/Gemm/WithoutBiases`); else []."""
        if name in self.op:
            return [name]
        if name in self.producer:
            return self.fused_chain(self.producer[name])
        parts = name.split("/")
        for k in range(len(parts) - 1, 1, -1):
            prefix = "/".join(parts[:k])
            if prefix in self.op:
                return [prefix]
        return []


def unique(names) -> list[str]:
    """Names in first-seen order, without repeats or empty ones."""
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def fx_profile(gm, args, iters: int, warmup: int, layer_of: Callable, cuda: bool = False
               ) -> list[dict]:
    """Per-node profile of an FX GraphModule run node by node (`torch.fx.Interpreter`), each
    node inside a `record_function`, under `torch.profiler`: a node's time is the CPU time
    (CUDA: device time) of everything it ran. `layer_of(node)` -> hilq layer name or None
    (its `sources`). The interpreter's own Python overhead is outside the ranges."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    tag = "hilq_fx::"
    nodes = {n.name: n for n in gm.graph.nodes
             if n.op in ("call_function", "call_module", "call_method")}

    class Recorded(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name not in nodes:
                return super().run_node(n)
            with record_function(tag + n.name):
                return super().run_node(n)

    interp = Recorded(gm)
    with torch.no_grad():
        for _ in range(max(1, warmup)):
            interp.run(*args)
        if cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(iters):
                interp.run(*args)
            if cuda:
                torch.cuda.synchronize()
    us: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith(tag):
            t = e.device_time_total if cuda else e.cpu_time_total
            us[e.name[len(tag):]] = us.get(e.name[len(tag):], 0.0) + float(t)
    out = []
    for name, n in nodes.items():
        if name not in us:
            continue
        if n.op == "call_module":
            op, exec_ = type(gm.get_submodule(n.target)).__name__, str(n.target)
        else:
            op, exec_ = str(n.target), None
        layer = layer_of(n)
        out.append({"name": name, "op": op, "ms": us[name] / iters / 1000.0,
                    "sources": [layer] if layer else [], "exec": exec_})
    return out
