"""The objects that say *what* to quantize: `QuantSpec`, `LayerPrecision`, `BitConfig`.

They are plain frozen dataclasses so they cross layers (CLI, allocator, exporter, store)
as JSON without carrying any torch state. Variant names (`w8a8`, `w4a16`, `fp32`, ...)
parse to a uniform `BitConfig`; a per-layer config is what `hilq search` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
CALIBRATIONS = ("minmax", "ema", "percentile", "mse", "entropy")
FLOAT_VARIANTS = ("fp32", "fp16", "bf16")

# Calibration data: real samples, ZeroQ's distilled inputs (data-free), or Gaussian noise.
CALIB_DATA = ("real", "distilled", "noise")
# ZeroQ iterations: its paper runs 500, but with hilq's declared input prior 25–100 already
# match real photos and more drift further with ZeroQ's own (docs/distill.md).
DISTILL_ITERS = 100
SENSITIVITIES = ("kl", "hessian")    # ZeroQ's KL, HAWQ's Hessian trace


class SpecError(ValueError):
    """A quantization setting that cannot be honoured (bad bits, unknown method, ...)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: a uniform affine grid and how its range is found.

    `symmetric` fixes the zero-point at 0 (signed grid); otherwise the grid is unsigned with
    a zero-point. `narrow_range` drops the most negative code (-127..127 for 8 bits) so that
    the grid is symmetric around zero, as TensorRT and some accelerators require.
    `axis` is the channel axis for per-channel and the grouped axis for per-group specs.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    narrow_range: bool = False
    rounding: str = "nearest"
    calib: str = "minmax"
    dynamic: bool = False
    percentile: float = 99.99

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise SpecError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"unknown granularity {self.granularity!r} (use {', '.join(GRANULARITIES)})")
        if self.rounding not in ROUNDINGS:
            raise SpecError(f"unknown rounding {self.rounding!r} (use {', '.join(ROUNDINGS)})")
        if self.calib not in CALIBRATIONS:
            raise SpecError(f"unknown calibration {self.calib!r} (use {', '.join(CALIBRATIONS)})")
        if self.granularity == "group" and self.group_size < 1:
            raise SpecError(f"group_size must be positive, got {self.group_size}")
        if self.bits == 1 and self.symmetric:
            # A signed 1-bit grid is {-1, 0}: no sign to speak of. Binary weights are
            # sign x alpha (quant.codebook.binarize); a uniform 1-bit grid is asymmetric {0, 1}.
            raise SpecError("1-bit uniform quantization must be asymmetric; "
                            "for sign x alpha weights use quant.codebook.binarize")
        if not 0.0 < self.percentile <= 100.0:
            raise SpecError(f"percentile must be in (0, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1 - (1 if self.narrow_range else 0)

    def with_(self, **changes) -> QuantSpec:
        return replace(self, **changes)


def weight_spec(bits: int, granularity: str = "channel", **kw) -> QuantSpec:
    """Default weight spec: symmetric, per output channel (axis 0)."""
    return QuantSpec(bits=bits, symmetric=True, granularity=granularity, axis=0, **kw)


def act_spec(bits: int, calib: str = "minmax", **kw) -> QuantSpec:
    """Default activation spec: asymmetric (unsigned) per-tensor, as x86 INT8 kernels want."""
    kw.setdefault("symmetric", False)
    return QuantSpec(bits=bits, granularity="tensor", calib=calib, **kw)


@dataclass(frozen=True)
class LayerPrecision:
    """One conv/linear layer's precision: `None` means that tensor stays float."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None

    @property
    def w_bits(self) -> int | None:
        return self.weight.bits if self.weight else None

    @property
    def a_bits(self) -> int | None:
        return self.act.bits if self.act else None

    @property
    def name(self) -> str:
        """Variant-style name of this precision: `w4a8`, `w8a16` (weight-only), `fp32`."""
        if self.weight is None and self.act is None:
            return "fp32"
        w = self.w_bits if self.weight else 32
        a = self.a_bits if self.act else 16
        return f"w{w}a{a}"


@dataclass(frozen=True)
class BitConfig:
    """Per-layer precisions; layers not named stay float. The allocator's output unit."""

    layers: dict[str, LayerPrecision] = field(default_factory=dict)

    def __hash__(self):
        return hash(self.to_json())

    def get(self, layer: str) -> LayerPrecision:
        return self.layers.get(layer, LayerPrecision())

    def to_dict(self) -> dict:
        return {name: {"weight": asdict(p.weight) if p.weight else None,
                       "act": asdict(p.act) if p.act else None}
                for name, p in self.layers.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> BitConfig:
        layers = {}
        for name, p in d.items():
            if not isinstance(p, dict) or set(p) - {"weight", "act"}:
                raise SpecError(f"layer {name!r}: expected keys 'weight' and 'act'")
            layers[name] = LayerPrecision(
                weight=QuantSpec(**p["weight"]) if p.get("weight") else None,
                act=QuantSpec(**p["act"]) if p.get("act") else None,
            )
        return cls(layers)

    @classmethod
    def load(cls, path: str | Path) -> BitConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise SpecError(f"bit config file not found: {path}") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise SpecError(f"bad bit config file {path}: {e}") from None

    @classmethod
    def uniform(cls, layer_names, weight: QuantSpec | None, act: QuantSpec | None) -> BitConfig:
        return cls({n: LayerPrecision(weight, act) for n in layer_names})

    def summary(self) -> dict[str, str]:
        """layer -> `wXaY` name, for tables and reports."""
        return {n: p.name for n, p in self.layers.items()}


_VARIANT = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class Variant:
    """A parsed variant name. `w_bits`/`a_bits` of None mean float; `a_bits` 16 = weight-only."""

    name: str
    w_bits: int | None = None
    a_bits: int | None = None
    float_dtype: str = "fp32"
    config_path: str | None = None

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.config_path is None

    @property
    def weight_only(self) -> bool:
        return self.w_bits is not None and self.a_bits is None


def parse_variant(name: str) -> Variant:
    """`fp32|fp16|bf16`, `wXaY` (Y in 1..8 or 16 for weight-only), or `config:PATH.json`."""
    name = name.strip()
    if name in FLOAT_VARIANTS:
        return Variant(name, float_dtype=name)
    if name.startswith("config:"):
        path = name[len("config:"):]
        if not Path(path).is_file():
            raise SpecError(f"variant {name!r}: file not found")
        return Variant(name, config_path=path)
    m = _VARIANT.match(name)
    if not m:
        raise SpecError(f"unknown variant {name!r} (use fp32, fp16, bf16, wXaY such as w8a8/w4a16, "
                        "or config:PATH.json)")
    w, a = int(m.group(1)), int(m.group(2))
    if not 1 <= w <= 8:
        raise SpecError(f"variant {name!r}: weight bits must be 1..8")
    if a == 16:
        return Variant(name, w_bits=w, a_bits=None)
    if not 1 <= a <= 8:
        raise SpecError(f"variant {name!r}: activation bits must be 1..8, or 16 for weight-only")
    return Variant(name, w_bits=w, a_bits=a)


def variant_config(variant: Variant, layer_names, *, granularity: str = "channel",
                   calib: str = "minmax", group_size: int = 128) -> BitConfig:
    """The `BitConfig` a variant name stands for, over the given quantizable layers."""
    if variant.config_path:
        return BitConfig.load(variant.config_path)
    if variant.is_float:
        return BitConfig({})
    w = weight_spec(variant.w_bits, granularity=granularity, group_size=group_size)
    a = act_spec(variant.a_bits, calib=calib) if variant.a_bits else None
    return BitConfig.uniform(layer_names, w, a)


REPAIRS = ("cle", "split", "bias", "adaround")   # in pipeline order
REPAIR_HELP = {"cle": "cross-layer equalization (before calibration)",
               "split": "outlier channel splitting (before calibration)",
               "bias": "empirical bias correction (after calibration)",
               "adaround": "AdaRound, learned weight rounding (after calibration)"}


def parse_repairs(items: str | Iterable[str] | None) -> tuple[str, ...]:
    """`"bias,cle"` or `["bias", "cle"]` → the known repairs in pipeline order."""
    if items is None:
        return ()
    if isinstance(items, str):
        items = items.split(",")
    names = [s.strip().lower() for s in items if s.strip()]
    for n in names:
        if n not in REPAIRS:
            raise SpecError(f"unknown repair {n!r} (use {', '.join(REPAIRS)})")
    return tuple(r for r in REPAIRS if r in names)


class ModelError(SpecError):
    """Unknown model name, a factory that cannot be imported, or data of the wrong shape."""


class ExportError(SpecError):
    """A model or setting that cannot be written as Q/DQ ONNX (the message says why)."""
