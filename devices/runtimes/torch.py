"""PyTorch CPU: runs a `torch.export` program (`.pt2`) eagerly or through `torch.compile`.

Protocol keys: `threads` (torch.set_num_threads; inter-op threads 1), `batch`, `torch_mode`
("eager" | "compile"; default "compile" for every variant, so FP32 and INT8 are compared
under the same compiler). Compiling uses inductor with `freezing = True`: weights become
constants, which is what lets inductor prepack them and, for a PT2E W8A8 program, fuse the
Q/DQ patterns into oneDNN `qconv`/`qlinear` kernels (the passes are registered by importing
torchao's x86 quantizer module, done here before compiling).

Kernels are read from the FX graph that actually runs:
- eager: the program's own graph. A PT2E program run eagerly computes every conv/linear in
  float on dequantized tensors, so an eager `w8a8` run reports float layers (degraded).
- compile: the post-grad graph inductor lowers (captured with `post_grad_custom_post_pass`):
  `qconv*`/`qlinear*` nodes are integer; `aten.convolution`, `mm`/`addmm`, mkldnn/mkl float
  kernels, and any op decomposed from a linear/conv (inductor turns tiny linears into
  mul+sum) are float. Limits: an integer kernel is named by its graph node (`qconv_3`), not by
  the source layer (the fused node loses that link); `source_layers` gives the program's conv
  and linear count so a missing kernel shows up as a count mismatch.

`profile(feeds, iters)` runs `torch.profiler` over `iters` inferences:
- eager: the program node by node (`runtimes.fx_profile`), each node's ops in one range;
  sources = the conv/linear module path (a hilq layer name) of the node, or of the one
  conv/linear a dequantize node feeds; other nodes have none.
- compile: the ops inductor's compiled graph calls (oneDNN `qconv_pointwise`, `mkldnn`
  kernels, ...) by name and occurrence, plus `inductor_generated` (the graph's time outside
  them: inductor's own C++ kernels, which emit no profiler events). Sources are [] (the
  fused kernels have lost the link to the source layer, see Limits above).
"""

from __future__ import annotations

import os
import re

import numpy as np

from . import Consumes, Option, Session, options

_INT_KERNEL = re.compile(r"(^|\.)q(conv|linear)(?!.*prepack)")
_FLOAT_KERNEL = re.compile(r"(^|\.)(convolution|conv\d?d|_convolution_pointwise|addmm|mm|bmm|"
                           r"linear|_linear_pointwise|_mkl_linear|baddbmm)(\.|$)")
_SOURCE = re.compile(r"^(conv\d?d|convolution|linear|addmm|mm|matmul)(_\d+)?(_default)?$")


def version() -> str:
    import torch

    return torch.__version__


CONSUMES = Consumes(format="torch-pt2", target="torch", activations="uint8")
OPTIONS = {"mode": Option(str, "compile", "torch.compile (inductor) or eager",
                          ("compile", "eager"))}


def precisions() -> dict[str, list[str]]:
    return {"conv": ["fp32", "w8a8"], "linear": ["fp32", "w8a8"]}


def _variant(path: str, protocol: dict) -> str:
    """The manifest's variant (else the protocol's). A file whose variant is applied at load
    time by torch-cuda is a float program here: running it would mislabel float as INT8."""
    from . import manifest_variant, read_manifest

    manifest = read_manifest(path)
    if manifest.get("settings", {}).get("quantized_at_load"):
        raise ValueError(f"{os.path.basename(path)} is a float program whose "
                         f"{manifest.get('variant')} is applied by the torch-cuda runtime "
                         "at load; the torch CPU runtime needs a PT2E program")
    return manifest_variant(path, protocol)


def _target_name(target) -> str:
    """Readable op name: `aten.convolution.default`, or a lowering's function name (`qconv`)."""
    func = getattr(target, "func", None)  # functools.partial from inductor's pattern matcher
    if func is not None:  # a fusion lowering: the kernel it emits is an op in its closure
        ops = [c.cell_contents for c in (getattr(func, "__closure__", None) or ())
               if type(c.cell_contents).__name__.startswith("OpOverload")]
        return str(ops[0]) if ops else getattr(func, "__qualname__", str(func))
    return str(target) if not callable(target) or hasattr(target, "_schema") else \
        getattr(target, "__name__", str(target))


def _layer(node) -> str:
    """The source module path of a node (from nn_module_stack), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or node.name


def classify(graph) -> dict:
    """Integer vs float compute kernels in an FX graph (see the module docstring)."""
    integer, floats = [], []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = _target_name(node.target)
        original = str(node.meta.get("original_aten") or "")
        if _INT_KERNEL.search(name):
            integer.append(node.name)
        elif _FLOAT_KERNEL.search(name) or _FLOAT_KERNEL.search(original):
            layer = _layer(node)
            if layer not in floats:
                floats.append(layer)
    return {"integer": integer, "float": floats}


def source_layers(graph) -> dict:
    """conv/linear counts of the exported program (what should appear as kernels)."""
    counts = {"conv": 0, "linear": 0}
    for node in graph.nodes:
        if node.op == "call_function":
            name = _target_name(node.target)
            if re.search(r"(^|\.)conv\d?d\.|convolution\.", name):
                counts["conv"] += 1
            elif re.search(r"(^|\.)(linear|addmm|mm|matmul)\.", name):
                counts["linear"] += 1
    return counts


_LAYER_TYPES = re.compile(r"\.(Conv[123]d|ConvTranspose[123]d|Linear)$")


def module_layer(node) -> str | None:
    """The conv/linear module (hilq layer name) a program node belongs to, or that the one
    node it feeds belongs to (a Q/DQ node of that layer's input or weight); else None."""
    def own(n):
        stack = n.meta.get("nn_module_stack") or {}
        path, kind = list(stack.values())[-1] if stack else ("", "")
        return path if path and _LAYER_TYPES.search(str(kind)) else None

    layer = own(node)
    if layer is None and "dequantize" in str(node.target) and len(node.users) == 1:
        layer = own(next(iter(node.users)))
    return layer


def compiled_profile(prof, iters: int) -> list[dict]:
    """Node records from a profile of a compiled program: the ops each compiled-graph call
    ran directly, named by op and occurrence within the call, and the rest of the call."""
    graph_call = "## Call CompiledFxGraph"
    totals: dict[str, list] = {}
    rest_us = 0.0
    for e in prof.events():
        if not e.name.startswith(graph_call):
            continue
        seen: dict[str, int] = {}
        rest_us += e.cpu_time_total
        for child in e.cpu_children:
            k = seen[child.name] = seen.get(child.name, -1) + 1
            rec = totals.setdefault(f"{child.name}#{k}", [child.name, 0.0])
            rec[1] += child.cpu_time_total
            rest_us -= child.cpu_time_total
    out = [{"name": name, "op": op, "ms": us / iters / 1000.0, "sources": [], "exec": op}
           for name, (op, us) in totals.items()]
    if totals or rest_us > 0:
        out.append({"name": "inductor_generated", "op": "inductor_generated",
                    "ms": max(rest_us, 0.0) / iters / 1000.0, "sources": [], "exec": None})
    return out


def _register_quantized_decomposed_ops() -> None:
    """`quantized_decomposed::*` (the Q/DQ ops of a PT2E program) are defined by a torch.ao
    module that nothing imports by default; `torch.export.load` fails without them."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401


def _register_x86_int8_passes() -> bool:
    """Importing torchao's x86 quantizer registers inductor's Q/DQ -> oneDNN fusion passes."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError:
        return False
    return True


def _set_threads(torch, protocol: dict) -> None:
    threads = int(protocol.get("threads", 0))
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process (only allowed once)


def _program_inputs(ep, batch: int) -> list[tuple[str, tuple, str]]:
    """(name, shape with the protocol's batch, dtype) of the program's user inputs."""
    user_inputs = ep.graph_signature.user_inputs
    inputs = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta["val"]
        shape = (batch, *(int(d) for d in val.shape[1:]))
        inputs.append((node.name, shape, str(val.dtype).replace("torch.", "")))
    return inputs


class TorchSession(Session):
    """The program run eagerly or compiled by inductor; `captured["graph"]` is the FX graph
    that actually runs (the kernels' source)."""

    def __init__(self, path: str, protocol: dict):
        import torch

        from . import check_variant

        self.variant = _variant(path, protocol)
        check_variant("torch", self.variant, precisions())
        self.mode = options(protocol, OPTIONS)["mode"]
        if self.mode not in ("eager", "compile"):
            raise ValueError(f"torch mode must be eager or compile, not {self.mode!r}")
        self.torch = torch
        _set_threads(torch, protocol)
        _register_quantized_decomposed_ops()  # a PT2E program's Q/DQ ops, before deserialising
        self.ep = torch.export.load(path)
        self.module = self.ep.module()
        self.inputs = _program_inputs(self.ep, int(protocol.get("batch", 1)))
        self.names = [name for name, _, _ in self.inputs]
        self.facts = {"engine": "torch", "version": torch.__version__, "mode": self.mode,
                      "variant": self.variant, "threads": torch.get_num_threads(),
                      "interop_threads": torch.get_num_interop_threads()}
        self.captured: dict = {}
        self.runner = self._compile() if self.mode == "compile" else self.module
        if self.mode != "compile":
            self.captured["graph"] = self.module.graph
        # compile now (first call), so loading, not the timed warm-up, pays for it
        rng = np.random.default_rng(0)
        self.run({n: rng.standard_normal(s).astype(d) for n, s, d in self.inputs})
        if self.mode == "compile":
            import torch._inductor.config as ic

            ic.post_grad_custom_post_pass = None
        self.warmup = max(1, int(protocol.get("warmup_iters", 10)))

    def _compile(self):
        """torch.compile with inductor's freezing and the x86 INT8 passes; the post-grad
        graph it lowers is captured on the first call."""
        import torch
        import torch._inductor.config as ic

        self.facts["torchao_passes"] = _register_x86_int8_passes()
        ic.freezing = True
        ic.post_grad_custom_post_pass = lambda g: self.captured.__setitem__("graph", g)
        self.facts["inductor"] = {"freezing": True, "cpp_wrapper": ic.cpp_wrapper,
                                  "max_autotune": ic.max_autotune}
        return torch.compile(self.module, dynamic=False)

    def _args(self, feeds: dict) -> list:
        return [self.torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.names]

    def run(self, feeds: dict) -> list[np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.names]
        with torch.no_grad():
            out = self.runner(*args)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.numpy() for o in outs]

    def kernels(self) -> dict:
        graph, source = self.captured.get("graph"), source_layers(self.ep.graph)
        if graph is None:  # e.g. compiled code from a cache that skipped the passes
            unverified = ["unverified: inductor's post-grad graph was not captured"]
            return {"integer": [], "float": [] if self.variant == "fp32" else unverified,
                    "source_layers": source}
        out = {**classify(graph), "source_layers": source}
        if self.variant != "fp32":  # a layer with no kernel found at all is not integer either
            for kind in ("conv", "linear"):
                found = sum(f"q{kind}" in n for n in out["integer"])
                if found < source[kind]:
                    out["float"].append(f"{source[kind] - found} of {source[kind]} {kind} "
                                        "layers have no integer kernel")
        return out

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        from . import fx_profile

        if self.mode == "eager":
            return fx_profile(self.module, self._args(feeds), iters, self.warmup, module_layer)
        for _ in range(self.warmup):
            self.run(feeds)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                self.run(feeds)
        return compiled_profile(prof, iters)


def load(path: str, protocol: dict) -> TorchSession:
    return TorchSession(path, protocol)
