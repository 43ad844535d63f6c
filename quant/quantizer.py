"""Uniform affine quantization: ranges -> (scale, zero-point) -> codes -> values.

Arithmetic follows PyTorch's `fake_quantize_per_{tensor,channel}_affine` exactly
(`q = clamp(nearbyint(x * (1/scale)) + zp)`, float32, round half to even) so that our
fake-quant and the reference agree bit for bit; the tests hold us to that.
`fake_quant` is differentiable with the straight-through estimator: the gradient passes
unchanged where the value was inside the grid and is zero where it was clipped.
"""

from __future__ import annotations

import torch

from .spec import QuantSpec

EPS = torch.finfo(torch.float32).eps


def _moved(x: torch.Tensor, axis: int) -> torch.Tensor:
    """`x` with `axis` first and everything else flattened: shape (C, -1)."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`x` as (rows, groups, group_size) with groups taken along `spec.axis`.

    Per-group quantization splits the reduction axis (input features of a Linear weight,
    `axis=1`) into blocks of `group_size`, as MatMulNBits and INT4 Q/DQ block quantization do.
    """
    axis = spec.axis % x.dim()
    xm = x.movedim(axis, -1)
    n = xm.shape[-1]
    if n % spec.group_size:
        raise ValueError(f"axis {axis} of size {n} is not a multiple of group_size {spec.group_size}")
    return xm.reshape(-1, n // spec.group_size, spec.group_size)


def minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed range of `x` at the spec's granularity (scalar, (C,), or (rows, groups))."""
    x = x.detach()
    if spec.granularity == "tensor":
        return x.min(), x.max()
    if spec.granularity == "channel":
        xm = _moved(x, spec.axis % x.dim())
        return xm.min(dim=1).values, xm.max(dim=1).values
    g = _grouped(x, spec)
    return g.min(dim=-1).values, g.max(dim=-1).values


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point covering [lo, hi], with zero exactly representable."""
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp(min=EPS)
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=EPS)
        zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax).to(torch.int64)
    return scale, zp


def _shape_for(x: torch.Tensor, t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape per-channel qparams so they broadcast against `x` along `spec.axis`."""
    if spec.granularity != "channel" or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[spec.axis % x.dim()] = -1
    return t.reshape(shape)


def _round(v: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None) -> torch.Tensor:
    if spec.rounding == "stochastic":
        # Unbiased: E[floor(v + U)] = v. Seeded through `generator` for reproducibility.
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return torch.floor(v + noise)
    return torch.round(v)


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes of `x` (as an int32 tensor) on the spec's grid."""
    if spec.granularity == "group":
        g = _grouped(x, spec)
        q = _codes(g, scale.unsqueeze(-1), zp.unsqueeze(-1), spec, generator)
        return _ungroup(q, x, spec).to(torch.int32)
    return _codes(x, _shape_for(x, scale, spec), _shape_for(x, zp, spec), spec, generator).to(torch.int32)


def _codes(x, scale, zp, spec, generator):
    inv = 1.0 / scale
    return torch.clamp(_round(x * inv, spec, generator) + zp, spec.qmin, spec.qmax)


def _ungroup(g: torch.Tensor, like: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    axis = spec.axis % like.dim()
    moved_shape = like.movedim(axis, -1).shape
    return g.reshape(moved_shape).movedim(-1, axis)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "group":
        g = _grouped(q.float(), spec)
        return _ungroup((g - zp.unsqueeze(-1)) * scale.unsqueeze(-1), q, spec)
    return (q.float() - _shape_for(q, zp, spec)) * _shape_for(q, scale, spec)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zp, spec, generator):
        if spec.granularity == "group":
            g = _grouped(x, spec)
            s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
            v = _round(g * (1.0 / s), spec, generator) + z
            inside = (v >= spec.qmin) & (v <= spec.qmax)
            out = (torch.clamp(v, spec.qmin, spec.qmax) - z) * s
            out, inside = _ungroup(out, x, spec), _ungroup(inside, x, spec)
        else:
            s, z = _shape_for(x, scale, spec), _shape_for(x, zp, spec)
            v = _round(x * (1.0 / s), spec, generator) + z
            inside = (v >= spec.qmin) & (v <= spec.qmax)
            out = (torch.clamp(v, spec.qmin, spec.qmax) - z) * s
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize-dequantize in float, gradient by the straight-through estimator."""
    return _FakeQuantSTE.apply(x, scale.to(x.dtype), zp, spec, generator)


def fake_quant_minmax(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quant `x` on its own min-max range: the weight path and dynamic activations."""
    scale, zp = qparams(*minmax(x, spec), spec)
    return fake_quant(x, scale, zp, spec)


def quant_error(x: torch.Tensor, spec: QuantSpec) -> float:
    """‖x − Q(x)‖² with min-max ranges: the weight-perturbation term of HAWQ sensitivity."""
    with torch.no_grad():
        return float(((x - fake_quant_minmax(x, spec)) ** 2).sum())
