"""hilq quantization: quantizers, calibration, PTQ repairs, ZeroQ, sensitivity, allocation,
integer-only reference and export. No I/O to devices, no knowledge of SSH or databases."""

from .spec import BitConfig, LayerPrecision, QuantSpec, SpecError, parse_variant

__all__ = ["BitConfig", "LayerPrecision", "QuantSpec", "SpecError", "parse_variant"]
