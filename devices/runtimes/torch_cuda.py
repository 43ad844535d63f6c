"""PyTorch on an NVIDIA GPU: FP16/BF16 baselines and integer GEMMs, timed with CUDA events.

The artifact is the *float* `torch.export` program (`quant.export_torch.build(...,
device="cuda")`); the variant is applied here at load time by rewriting the program's
`aten.linear` / `aten.conv2d` nodes into small kernel modules:

- `fp32` / `fp16` / `bf16`: the program cast to that dtype.
- `w8a8`: int8 weights per output channel (symmetric), int8 activations with a dynamic
  per-row (per-token / per-output-pixel) scale, `torch._int_mm` (int32 accumulation), then
  rescale in float32. Convs run as GEMMs: 1x1/stride-1 by a reshape, others by im2col
  (`F.unfold`). The rest of the network runs in fp16.
- `w4a16`: int4 weights, asymmetric, group size 128 along K, tinygemm
  (`aten._weight_int4pack_mm`, bf16 activations); the rest of the network in bf16.
  K is zero-padded to a multiple of 128 (tinygemm's tile), N must be a multiple of 8.

A layer that cannot take the integer kernel (grouped conv, N not a multiple of 8) stays float
and is listed under "float" by `kernels()`, so the run is stored as degraded, never as integer.
Timing: `run` copies inputs in, runs, synchronises and copies outputs out; `device_timer`
brackets the same call with CUDA events (so device time includes the copies too).
`profile(feeds, iters)`: `torch.profiler` with CUDA activity over the program run node by node
(`runtimes.fx_profile`): each node's CUDA kernel time, sources = the layer (module path of its
weight) for conv/linear nodes and the int kernel modules that replaced them. Written against
the documented API; not run on the machines hilq was developed on (no GPU there).

The quantize/pack/GEMM functions work on CPU tensors as well (`_int_mm` and the `_for_cpu`
tinygemm ops), which is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import numpy as np

from . import Consumes, Option, Session

GROUP = 128          # int4 group size along K (also tinygemm's K tile with inner_k_tiles=8)
INNER_K_TILES = 8


def version() -> str:
    import torch

    if not torch.cuda.is_available():
        raise ImportError(f"torch {torch.__version__} sees no CUDA GPU "
                          f"(built with CUDA {torch.version.cuda or 'none'})")
    return f"{torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.get_device_name()})"


# the .pt2 program is exported on the CUDA device: its weights and constants live there
CONSUMES = Consumes(format="torch-pt2", target="torch", activations="float", device="cuda")
OPTIONS: dict[str, Option] = {}


def precisions() -> dict[str, list[str]]:
    return {"conv": ["fp32", "fp16", "bf16", "w8a8", "w4a16"],
            "linear": ["fp32", "fp16", "bf16", "w8a8", "w4a16"]}


# ------------------------------------------------------------------ pure kernels (CPU-testable)

def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_int8_rows(x):
    """Symmetric int8 per row: (q int8 [M,K], scale float32 [M,1])."""
    import torch

    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_gemm(x, wq, w_scale, bias=None, out_dtype=None):
    """y = x @ W^T with W = wq * w_scale (wq int8 [N,Kp], K padded to a multiple of 8):
    x quantized per row, `torch._int_mm` (M padded to > 16, cuBLASLt's minimum), int32
    accumulation, float32 rescale."""
    import torch
    import torch.nn.functional as F

    m, k = x.shape
    n, kp = wq.shape
    xq, xs = quantize_int8_rows(x)
    rows = max(m, 17)
    if kp != k or rows != m:
        xq = F.pad(xq, (0, kp - k, 0, rows - m))
    acc = torch._int_mm(xq, wq.t())[:m]
    y = acc.float() * xs * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def quantize_int8_weight(w2d):
    """Per-output-channel symmetric int8, K zero-padded to a multiple of 8 (`_int_mm`)."""
    import torch.nn.functional as F

    q, scale = quantize_int8_rows(w2d)
    return F.pad(q, (0, _pad_to(q.shape[1], 8) - q.shape[1])), scale.reshape(-1)


def quantize_int4_groups(w2d, group: int = GROUP):
    """Asymmetric int4 per group of `group` along K (tinygemm's convention):
    w ≈ (q - 8) * scale + zero, q in 0..15. K is zero-padded to a multiple of `group`.
    Returns (q int32 [N,Kp], scales_and_zeros bf16 [Kp/group, N, 2])."""
    import torch
    import torch.nn.functional as F

    n, k = w2d.shape
    w = F.pad(w2d.float(), (0, _pad_to(k, group) - k)).reshape(n, -1, group)
    lo, hi = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + scale * 8
    q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, -1)
    sz = torch.cat([scale, zero], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q, sz


def dequantize_int4_groups(q, sz, group: int = GROUP):
    """The float weight tinygemm computes with (for tests and error estimates)."""
    n = q.shape[0]
    s = sz.float().transpose(0, 1)                       # [N, G, 2]
    qg = q.float().reshape(n, -1, group)
    return ((qg - 8) * s[..., :1] + s[..., 1:]).reshape(n, -1)


def pack_int4(q):
    """tinygemm's packed layout, on the tensor's device (CUDA op, or its CPU twin)."""
    import torch

    if q.is_cuda:
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def int4_gemm(x, packed, sz, k_padded: int, bias=None, group: int = GROUP):
    """y = x @ W^T through tinygemm; x cast to bf16, K zero-padded to the packed width."""
    import torch
    import torch.nn.functional as F

    xb = x.to(torch.bfloat16)
    if xb.shape[1] != k_padded:
        xb = F.pad(xb, (0, k_padded - xb.shape[1]))
    op = (torch.ops.aten._weight_int4pack_mm if x.is_cuda
          else torch.ops.aten._weight_int4pack_mm_for_cpu)
    y = op(xb.contiguous(), packed, group, sz)
    return y + bias.to(y.dtype) if bias is not None else y


def _gemm_module(weight2d, bias, kind: str):
    """An nn.Module computing x[M,K] @ W^T + b with W held as int8 or packed int4."""
    import torch
    from torch import nn

    class Gemm(nn.Module):
        def __init__(self):
            super().__init__()
            self.kind, self.k = kind, weight2d.shape[1]
            self.register_buffer("bias", None if bias is None else bias.detach().float())
            if kind == "w8a8":
                wq, ws = quantize_int8_weight(weight2d.detach())
                self.register_buffer("wq", wq)
                self.register_buffer("w_scale", ws)
            else:
                q, sz = quantize_int4_groups(weight2d.detach())
                self.kp = q.shape[1]
                self.register_buffer("q", q)     # kept for packing after .to(device)
                self.register_buffer("sz", sz)
                self.packed = None

        def forward(self, x2d):
            if self.kind == "w8a8":
                return int8_gemm(x2d, self.wq, self.w_scale, self.bias)
            if self.packed is None or self.packed.device != x2d.device:
                self.packed = pack_int4(self.q.to(x2d.device))
            return int4_gemm(x2d, self.packed, self.sz.to(x2d.device), self.kp,
                             self.bias).to(x2d.dtype)

    with torch.no_grad():
        return Gemm()


def linear_module(weight, bias, kind: str):
    from torch import nn

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.gemm = _gemm_module(weight, bias, kind)

        def forward(self, x):
            y = self.gemm(x.reshape(-1, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])

    return Linear()


def conv_module(weight, bias, stride, padding, dilation, kind: str):
    """A groups=1 Conv2d as a GEMM: reshape for 1x1/stride 1/no padding, else im2col."""
    import torch.nn.functional as F
    from torch import nn

    out_c, _, kh, kw = weight.shape
    stride, padding, dilation = (tuple(v) if isinstance(v, (list, tuple)) else (v, v)
                                 for v in (stride, padding, dilation))
    pointwise = (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.gemm = _gemm_module(weight.reshape(out_c, -1), bias, kind)

        def forward(self, x):
            n, c, h, w = x.shape
            ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
            if pointwise:
                cols = x.permute(0, 2, 3, 1).reshape(-1, c)
            else:
                cols = F.unfold(x, (kh, kw), dilation, padding, stride).transpose(1, 2)
                cols = cols.reshape(-1, cols.shape[-1])
            y = self.gemm(cols)                                   # [N*Ho*Wo, O]
            return y.reshape(n, ho, wo, out_c).permute(0, 3, 1, 2).contiguous()

    return Conv()


# ------------------------------------------------------------------ program rewriting

def _is(node, name: str) -> bool:
    return node.op == "call_function" and str(node.target) == name


def _weighted_layers(gm):
    """(node, kind) for each aten.linear / aten.conv2d whose weight is a stored tensor."""
    out = []
    for node in gm.graph.nodes:
        for kind, name in (("linear", "aten.linear.default"), ("conv", "aten.conv2d.default")):
            if (_is(node, name) and len(node.args) > 1
                    and getattr(node.args[1], "op", None) == "get_attr"):
                out.append((node, kind))
    return out


def _attr(gm, node):
    if node is None:
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def quantize_program(gm, kind: str) -> tuple[list[str], list[str]]:
    """Rewrite linear/conv nodes of `gm` (in place) into int kernels. Returns (integer layer
    names, float layer names): what could not be rewritten stays float and is named."""
    integer, floats = [], []
    for i, (node, layer) in enumerate(_weighted_layers(gm)):
        args = list(node.args) + [None] * (7 - len(node.args))
        weight, bias = _attr(gm, args[1]), _attr(gm, args[2])
        name = args[1].target.rsplit(".", 1)[0] or node.name
        if layer == "linear":
            ok = weight.shape[0] % 8 == 0
            make = lambda w=weight, b=bias: linear_module(w, b, kind)  # noqa: E731
        else:
            stride, padding, dilation = (args[3] or 1), (args[4] or 0), (args[5] or 1)
            groups = args[6] or 1
            ok = groups == 1 and weight.shape[0] % 8 == 0 and not isinstance(padding, str)
            make = lambda w=weight, b=bias, s=stride, p=padding, d=dilation: \
                conv_module(w, b, s, p, d, kind)  # noqa: E731
        if not ok:
            floats.append(name)
            continue
        target = f"_hilq_{kind}_{i}"
        gm.add_submodule(target, make())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (args[0],))
        new.meta["hilq_layer"] = name   # the profile's link back to the layer
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        integer.append(name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return integer, floats


def to_device(gm, device, dtype) -> None:
    """Move parameters, buffers and plain tensor constants (an unlifted export program keeps
    some as attributes, which `Module.to` skips) to `device`; float ones outside the int
    kernel modules are cast to `dtype` (the kernels keep their scales' own dtypes)."""
    import torch

    for mname, mod in gm.named_modules():
        cast = "_hilq_" not in mname
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is not None:
                    t.data = t.data.to(device, dtype if cast and t.is_floating_point() else None)
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                setattr(mod, k, v.to(device, dtype if cast and v.is_floating_point() else None))


def layer_of(node) -> str | None:
    """The hilq layer a program node computes (its `profile` sources): an int kernel module
    that replaced it, or a float linear/conv of a stored weight; else None."""
    if node.meta.get("hilq_layer"):
        return node.meta["hilq_layer"]
    if any(_is(node, k) for k in ("aten.linear.default", "aten.conv2d.default")) and \
            len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
        return node.args[1].target.rsplit(".", 1)[0] or None
    return None


def _float_program(path: str):
    """The exported float program; a PT2E (x86 INT8) program is refused."""
    import torch

    ep = torch.export.load(path)
    if any(str(n.target).startswith("quantized_decomposed.") for n in ep.graph.nodes):
        raise ValueError("this .pt2 is a PT2E x86 INT8 program (for the `torch` CPU runtime); "
                         "torch-cuda needs the float program (export_torch device='cuda')")
    return ep


def _facts(torch, dev, variant: str, dtype) -> dict:
    props = torch.cuda.get_device_properties(dev)
    return {"engine": "torch-cuda", "version": torch.__version__, "cuda": torch.version.cuda,
            "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "variant": variant, "compute_dtype": str(dtype).replace("torch.", ""),
            "int8": "torch._int_mm, per-channel weights, dynamic per-row activations"
            if variant == "w8a8" else None,
            "int4": f"tinygemm _weight_int4pack_mm, group {GROUP}, asymmetric"
            if variant == "w4a16" else None}


class TorchCudaSession(Session):
    """The float program with the variant applied (int kernel modules or a cast), on the
    GPU; `device_timer` brackets each call with CUDA events."""

    def __init__(self, path: str, protocol: dict):
        import torch

        from . import CudaEventTimer, check_variant, manifest_variant

        version()  # ImportError with the reason when there is no GPU
        self.torch = torch
        variant = manifest_variant(path, protocol)
        check_variant("torch-cuda", variant, precisions())
        ep = _float_program(path)
        self.gm = gm = ep.module()
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                      "w8a8": torch.float16, "w4a16": torch.bfloat16}[variant]
        layers = [(n.args[1].target.rsplit(".", 1)[0] or n.name) for n, _ in _weighted_layers(gm)]
        if variant in ("w8a8", "w4a16"):
            self.integer, self.floats = quantize_program(gm, variant)
        else:
            self.integer, self.floats = [], layers
        self.dev = torch.device("cuda")
        to_device(gm, self.dev, self.dtype)
        batch = int(protocol.get("batch", 1))
        user = ep.graph_signature.user_inputs
        self.inputs = [(n.name, (batch, *(int(d) for d in n.meta["val"].shape[1:])), "float32")
                       for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
        self.names = [name for name, _, _ in self.inputs]
        rng = np.random.default_rng(0)
        self.run({n: rng.standard_normal(s).astype(np.float32)
                  for n, s, _ in self.inputs})  # packs int4
        self.facts = _facts(torch, self.dev, variant, self.dtype)
        self.warmup = max(1, int(protocol.get("warmup_iters", 10)))
        self.device_timer = CudaEventTimer()

    def _args(self, feeds: dict) -> list:
        return [self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.dev, self.dtype)
                for n in self.names]

    def run(self, feeds: dict) -> list[np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.dev, self.dtype)
                    for n in self.names]
            out = self.gm(*args)
            outs = out if isinstance(out, (list, tuple)) else [out]
            res = [o.float().cpu().numpy() for o in outs]   # .cpu() synchronises
        torch.cuda.synchronize()
        return res

    def kernels(self) -> dict:
        return {"integer": list(self.integer), "float": list(self.floats)}

    def profile(self, feeds: dict, iters: int) -> list[dict]:
        from . import fx_profile

        return fx_profile(self.gm, self._args(feeds), iters, self.warmup, layer_of, cuda=True)

    def memory(self) -> dict:
        return cuda_memory()


def load(path: str, protocol: dict) -> TorchCudaSession:
    return TorchCudaSession(path, protocol)


def cuda_memory() -> dict:
    """Peak GPU memory of this process: PyTorch's caching allocator (allocated: tensors;
    reserved: what it holds from the driver), since the process started."""
    import torch

    return {"cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 2),
            "cuda_max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 2)}
