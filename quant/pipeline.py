"""One model, one `BitConfig`, end to end: fold, repair, calibrate, fine-tune, evaluate, size.

`quantize_model(entry, config, ...)` runs the fixed order

    fold BN → [cle] → [split] → prepare + calibrate → [bias] → [adaround] → [QAT]

and returns a `QuantResult` with the quantized model, the folded float model it came from,
accuracy before and after (None for models without labels), agreement with FP32, weight
sizes and the wall time. Repairs are named in `REPAIRS`; their order is the pipeline's, not
the caller's. Calibration data is `real` (the model's own calibration split), `distilled`
(ZeroQ, from the BatchNorm statistics of the unfolded model) or `noise` (seeded Gaussian).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .evaluate import Agreement, agreement, logits, top1
from .models import ModelEntry
from .spec import (
    CALIB_DATA,
    DISTILL_ITERS,
    REPAIR_HELP,  # noqa: F401  (re-exported)
    REPAIRS,  # noqa: F401  (re-exported)
    BitConfig,
    SpecError,
    parse_repairs,
    parse_variant,
    variant_config,
)
from .transform import (
    batches,
    calibrate,
    fold_bn,
    layer_infos,
    prepare,
    quantizable_layers,
    size_bits,
)


@dataclass
class QuantResult:
    qmodel: nn.Module
    fmodel: nn.Module                   # the folded (and repaired) float model
    fp32_top1: float | None             # fractions in 0..1; None without labels
    quant_top1: float | None
    fp32_size_bytes: int
    quant_size_bytes: int
    bit_config: BitConfig
    seconds: float
    agreement: Agreement | None = None  # quantized vs FP32 outputs on the test inputs
    notes: list[str] = field(default_factory=list)
    calib_x: torch.Tensor | None = None  # what it was calibrated on (the export reuses it)

    @property
    def compression(self) -> float:
        return self.fp32_size_bytes / max(1, self.quant_size_bytes)


def variant_bit_config(model: nn.Module, variant: str, *, granularity: str = "channel",
                       calib: str = "minmax", group_size: int = 128,
                       notes: list[str] | None = None) -> BitConfig:
    """The uniform `BitConfig` a variant name stands for on `model`'s quantizable layers.

    With `granularity="group"`, a layer whose reduction size (in_features, or cin·kh·kw)
    is not a multiple of `group_size` cannot be grouped; it gets per-channel weights and
    the fact is appended to `notes` (and is visible in the config itself)."""
    v = parse_variant(variant)
    names = quantizable_layers(model)
    cfg = variant_config(v, names, granularity=granularity, calib=calib, group_size=group_size)
    if granularity != "group" or v.config_path or v.is_float:
        return cfg
    modules = dict(model.named_modules())
    layers, ungrouped = dict(cfg.layers), []
    for name, p in cfg.layers.items():
        w = modules[name].weight
        if p.weight is not None and (w[0].numel() % group_size):
            layers[name] = type(p)(p.weight.with_(granularity="channel"), p.act)
            ungrouped.append(name)
    if ungrouped and notes is not None:
        notes.append(f"per-channel weights (reduction size not a multiple of group "
                     f"{group_size}): {', '.join(ungrouped)}")
    return BitConfig(layers)


def _float_param_bits(model: nn.Module, infos: dict) -> int:
    """Parameters outside the quantizable layers (LayerNorm, positions, ...): 32 bits each."""
    inside = set()
    for name in infos:
        inside.update(id(p) for p in model.get_submodule(name).parameters())
    return 32 * sum(p.numel() for p in model.parameters() if id(p) not in inside)


def _calib_x(kind: str, entry: ModelEntry, model: nn.Module, real: torch.Tensor | None,
             seed: int, distill_iters: int, objective: str = "batch") -> torch.Tensor:
    from . import zeroq

    n = len(real) if real is not None else 32
    if kind == "distilled":
        n = min(n, 64)
        return zeroq.calibration_data(kind, model, n=n, input_shape=entry.input_shape,
                                      seed=seed, name=entry.name, iters=distill_iters,
                                      objective=objective,
                                      **zeroq.input_prior(entry.preprocess))
    return zeroq.calibration_data(kind, model, real=real, n=n, input_shape=entry.input_shape,
                                  seed=seed, name=entry.name)


def _before_calibration(fmodel: nn.Module, repairs) -> nn.Module:
    """The repairs that change the float model: cross-layer equalization, outlier split."""
    if "cle" in repairs:
        from .repairs import equalize
        fmodel = equalize(fmodel)
    if "split" in repairs:
        from .repairs import split_outliers
        fmodel = split_outliers(fmodel)
    return fmodel


def _after_calibration(qmodel, fmodel, calib_x, repairs, adaround_iters: int, seed: int):
    """The repairs that change the quantized model against the float one."""
    if "bias" in repairs:
        from .repairs import bias_correction
        bias_correction(qmodel, fmodel, calib_x)
    if "adaround" in repairs:
        from .repairs import adaround
        adaround(qmodel, fmodel, calib_x, iters=adaround_iters, seed=seed)


def quantize_model(entry: ModelEntry, config: BitConfig, *, repairs: Iterable[str] = (),
                   calib_data: str = "real", qat_epochs: int = 0, seed: int = 0,
                   model: nn.Module | None = None, adaround_iters: int = 300,
                   distill_iters: int = DISTILL_ITERS, distill_objective: str = "batch") -> QuantResult:
    """Quantize `entry`'s model to `config` and measure it. `model` reuses an already built
    float model (it is not modified). Seeded: same arguments, same result."""
    start = time.perf_counter()
    if calib_data not in CALIB_DATA:
        raise SpecError(f"unknown calibration data {calib_data!r} (use {', '.join(CALIB_DATA)})")
    if qat_epochs < 0:
        raise SpecError(f"--qat-epochs must be >= 0, got {qat_epochs}")
    repairs = parse_repairs(repairs)
    torch.manual_seed(seed)
    model = (model if model is not None else entry.build()).eval()
    data = entry.data()
    if qat_epochs and (data.train_x is None or data.train_y is None):
        raise SpecError(f"model {entry.name!r} has no labelled training data: QAT "
                        "(--qat-epochs) needs train_x and train_y from its data factory")
    notes: list[str] = []

    fmodel = _before_calibration(fold_bn(model), repairs)
    calib_x = _calib_x(calib_data, entry, model, data.calib_x, seed, distill_iters,
                       distill_objective)
    if data.test_y is not None:
        from .data import check_labels
        with torch.no_grad():
            check_labels(data, int(model(data.test_x[:1]).shape[-1]))
    if calib_data != "real":
        notes.append(f"calibrated on {len(calib_x)} {calib_data} samples")
    qmodel = calibrate(prepare(fmodel, config, fold=False), batches(calib_x))
    _after_calibration(qmodel, fmodel, calib_x, repairs, adaround_iters, seed)
    if qat_epochs:
        from .qat import finetune
        qmodel = finetune(qmodel, fmodel, data.train_x, data.train_y, epochs=qat_epochs,
                          seed=seed)
        notes.append(f"QAT: {qat_epochs} epoch(s) with distillation from FP32")
    qmodel.eval()

    fp32_top1 = quant_top1 = None
    if data.test_y is not None:
        fp32_top1 = top1(model, data.test_x, data.test_y)
        quant_top1 = top1(qmodel, data.test_x, data.test_y)
    agree = None if entry.data_free else agreement(logits(model, data.test_x),
                                                   logits(qmodel, data.test_x))

    infos = layer_infos(fmodel, entry.input_shape)
    extra = _float_param_bits(fmodel, infos)
    fp32_bits = size_bits(infos, BitConfig({})) + extra
    quant_bits = size_bits(infos, config) + extra
    return QuantResult(qmodel, fmodel, fp32_top1, quant_top1, -(-fp32_bits // 8),
                       -(-quant_bits // 8), config, time.perf_counter() - start, agree, notes,
                       calib_x)
