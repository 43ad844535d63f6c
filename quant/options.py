"""The quant verbs' options: frozen dataclasses that check themselves on construction, so a
bad setting is one line before any work, and each default is written once (the CLI's flags,
the nightly config and the library all build these). Torch-free: `hilq --help` reads the
defaults without importing PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .spec import (
    CALIB_DATA,
    CALIBRATIONS,
    DISTILL_ITERS,
    GRANULARITIES,
    ExportError,
    SpecError,
    parse_repairs,
)

TARGETS = ("cpu", "tensorrt", "torch")
SENSITIVITY_METHODS = ("kl", "hessian")   # ZeroQ's output KL; HAWQ's Hessian trace
ROUTES = ("auto", "torch", "onnx")      # an ONNX file's integer variants: quant.onnx_artifact
OBJECTIVES = ("batch", "sample")        # ZeroQ distillation: hilq's batch, or per sample


@dataclass(frozen=True)
class ExportOptions:
    """How `quant.export.build_artifact` builds a variant's artifact. `target`: cpu (ONNX
    Q/DQ, UINT8 asymmetric activations), tensorrt (INT8 symmetric, narrow-range weights) or
    torch (`torch.export`, on `device`: cpu or cuda). Everything here is in the cache key."""

    target: str = "cpu"
    calib: str = "minmax"
    granularity: str = "channel"
    group_size: int = 128
    repairs: tuple[str, ...] = ()
    seed: int = 0
    calib_data: str = "real"             # real | distilled (ZeroQ, data-free) | noise
    distill_iters: int = DISTILL_ITERS
    distill_objective: str = "batch"
    device: str = "cpu"                  # the torch target's device
    route: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "repairs", tuple(self.repairs))
        for name, value, allowed in (
                ("target", self.target, TARGETS), ("calib", self.calib, CALIBRATIONS),
                ("granularity", self.granularity, GRANULARITIES),
                ("calib data", self.calib_data, CALIB_DATA),
                ("distill objective", self.distill_objective, OBJECTIVES),
                ("route", self.route, ROUTES)):
            if value not in allowed:
                raise ExportError(f"unknown {name} {value!r} (use {', '.join(allowed)})")
        for name in ("group_size", "distill_iters"):
            if getattr(self, name) < 1:
                raise ExportError(f"{name.replace('_', ' ')} {getattr(self, name)}: "
                                  "must be at least 1")


@dataclass(frozen=True)
class QuantizeOptions:
    """How `quant.quantize.quantize` quantizes a model in simulation (fake-quant): weights
    symmetric (per output channel by default), activations asymmetric per tensor, calibrated
    statically; `a_bits` 16 keeps activations float (weight-only, `w4a16`)."""

    w_bits: int = 8
    a_bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    calib: str = "minmax"
    repairs: tuple[str, ...] = ()        # cle, split, bias, adaround (run in that order)
    adaround_iters: int = 300
    calib_data: str = "real"             # real | distilled (ZeroQ, data-free) | noise
    distill_iters: int = DISTILL_ITERS
    distill_objective: str = "batch"
    qat_epochs: int = 0                  # quantization-aware fine-tuning after PTQ
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "repairs", parse_repairs(self.repairs))
        if not 1 <= self.w_bits <= 8:
            raise SpecError(f"w_bits {self.w_bits}: must be 1..8")
        if not (1 <= self.a_bits <= 8 or self.a_bits == 16):
            raise SpecError(f"a_bits {self.a_bits}: must be 1..8 (or 16 for weight-only)")
        for name, value, allowed in (
                ("granularity", self.granularity, GRANULARITIES),
                ("calib", self.calib, CALIBRATIONS), ("calib_data", self.calib_data, CALIB_DATA),
                ("distill_objective", self.distill_objective, OBJECTIVES)):
            if value not in allowed:
                raise SpecError(f"unknown {name} {value!r} (use {', '.join(allowed)})")
        for name, least in (("group_size", 1), ("adaround_iters", 1), ("distill_iters", 1),
                            ("qat_epochs", 0)):
            if getattr(self, name) < least:
                raise SpecError(f"{name} {getattr(self, name)}: must be at least {least}")

    @property
    def variant(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


@dataclass(frozen=True)
class SensitivityOptions:
    """How `quant.sensitivity.sensitivity` measures each layer's sensitivity: `method` kl
    (ZeroQ: output KL with that layer alone quantized) or hessian (HAWQ: trace × weight
    error), at each of `bits` (weights; `act_bits` also quantizes the layer's input), on a
    batch of `samples` that is data-free by default (ZeroQ-distilled from BatchNorm)."""

    method: str = "kl"
    bits: tuple[int, ...] = (2, 4, 8)
    act_bits: int | None = None
    calib_data: str = "distilled"
    samples: int = 32
    distill_iters: int = DISTILL_ITERS
    lr: float = 0.5                      # distillation's learning rate
    distill_objective: str = "batch"
    input_mean: float | None = None      # distillation target of the input (default: from
    input_std: float | None = None       # the declared preprocessing, else ZeroQ's 0 and 1)
    hessian_iters: int = 200             # most Hutchinson probes
    tol: float = 1e-3                    # Hutchinson's relative convergence tolerance
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits or any(not 1 <= b <= 8 for b in self.bits) \
                or len(set(self.bits)) != len(self.bits):
            raise SpecError(f"bits {','.join(map(str, self.bits))}: expected distinct "
                            "integers in 1..8, such as 2,4,8")
        if self.act_bits is not None and not 1 <= self.act_bits <= 8:
            raise SpecError(f"act_bits {self.act_bits}: must be 1..8")
        for name, value, allowed in (
                ("method", self.method, SENSITIVITY_METHODS),
                ("calib_data", self.calib_data, CALIB_DATA),
                ("distill_objective", self.distill_objective, OBJECTIVES)):
            if value not in allowed:
                raise SpecError(f"unknown {name} {value!r} (use {', '.join(allowed)})")
        for name, least in (("samples", 1), ("distill_iters", 0), ("hessian_iters", 1)):
            if getattr(self, name) < least:
                raise SpecError(f"{name} {getattr(self, name)}: must be at least {least}")


@dataclass(frozen=True)
class AllocateOptions:
    """How `quant.allocate.allocate` picks a precision per layer from a cost table: the least
    total sensitivity with each `budgets` column's sum within its bound (`method` ilp: HiGHS,
    any budgets; pareto: ZeroQ's DP, one budget); or, with `sweep`, a frontier of `points`
    budgets on that column. `ties`: layers forced to share one precision; `pins`: layer ->
    precision fixed."""

    budgets: dict = field(default_factory=dict)          # column -> bound
    method: str = "ilp"
    sweep: str | None = None
    points: int = 10
    bins: int | None = None              # size bins for pareto (None: exact for integer sizes)
    ties: tuple[tuple[str, ...], ...] = ()
    pins: dict = field(default_factory=dict)             # layer -> precision

    def __post_init__(self):
        object.__setattr__(self, "ties", tuple(tuple(t) for t in self.ties))
        if self.method not in ("ilp", "pareto"):
            raise SpecError(f"unknown method {self.method!r} (use ilp, pareto)")
        if not self.budgets and not self.sweep:
            raise SpecError("give at least one budget COLUMN=VALUE (or a sweep COLUMN)")
        for column, bound in self.budgets.items():
            if not isinstance(bound, int | float) or not math.isfinite(bound):
                raise SpecError(f"budget {column}={bound!r}: must be a finite number")
        if self.method == "pareto" and not self.sweep and len(self.budgets) != 1:
            raise SpecError("method pareto takes exactly one budget; use method ilp")
        if self.bins is not None and self.bins < 1:
            raise SpecError(f"bins {self.bins}: must be at least 1")
        if self.points < 1:
            raise SpecError(f"points {self.points}: must be at least 1")
        for t in self.ties:
            if len(t) < 2:
                raise SpecError(f"tie {','.join(t)!r}: needs at least two layers")
