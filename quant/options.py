"""The quant verbs' options: frozen dataclasses that check themselves on construction, so a
bad setting is one line before any work, and each default is written once (the CLI's flags,
the nightly config and the library all build these). Torch-free: `hilq --help` reads the
defaults without importing PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import CALIB_DATA, CALIBRATIONS, DISTILL_ITERS, GRANULARITIES, ExportError

TARGETS = ("cpu", "tensorrt", "torch")
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
