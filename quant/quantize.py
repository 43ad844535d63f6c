"""The quantize verb: a model to a variant in simulation (fake-quant), with its accuracy
before and after, its weight size and what was done to it, as one plain dict (what `hilq
quantize --json` writes). The options check themselves (`QuantizeOptions`), so a bad setting
is one line before PyTorch builds anything.
"""

from __future__ import annotations

import platform

from .options import QuantizeOptions


def quantize(model, options: QuantizeOptions | None = None) -> dict:
    """Quantize `model` (a built-in name, a `quant.models.ModelRef` or anything the model door
    takes) as `options` say (the defaults: w8a8); the result dict (`result`)."""
    import torch

    options = options or QuantizeOptions()
    from .models import load_model
    from .pipeline import quantize_model, variant_bit_config

    entry = load_model(model)
    net = entry.build()
    notes: list[str] = []
    config = variant_bit_config(net, options.variant, granularity=options.granularity,
                                calib=options.calib, group_size=options.group_size, notes=notes)
    res = quantize_model(entry, config, repairs=options.repairs, calib_data=options.calib_data,
                         distill_iters=options.distill_iters,
                         distill_objective=options.distill_objective,
                         qat_epochs=options.qat_epochs, seed=options.seed, model=net,
                         adaround_iters=options.adaround_iters)
    res.notes[:0] = notes
    data = getattr(model, "data", None) or entry.data().name
    return result(entry.name, data, options, res, torch.__version__)


def result(name: str, data: str, o: QuantizeOptions, res, torch_version: str) -> dict:
    """One quantization as plain data: the settings, accuracies (fractions in 0..1; models
    without labels report agreement with FP32), sizes, the bit config, notes and versions."""
    delta = None if res.fp32_top1 is None else res.quant_top1 - res.fp32_top1
    ag = res.agreement
    return {
        "model": name, "variant": o.variant, "w_bits": o.w_bits,
        "a_bits": None if o.a_bits == 16 else o.a_bits, "granularity": o.granularity,
        "group_size": o.group_size if o.granularity == "group" else None,
        "calib": o.calib, "calib_data": o.calib_data, "repairs": list(o.repairs),
        "qat_epochs": o.qat_epochs, "seed": o.seed, "data": data,
        "fp32_top1": res.fp32_top1, "quant_top1": res.quant_top1, "top1_delta": delta,
        "agreement_top1": ag.top1 if ag else None,
        "max_abs_diff": ag.max_abs_diff if ag else None,
        "mean_abs_diff": ag.mean_abs_diff if ag else None,
        "fp32_size_bytes": res.fp32_size_bytes, "quant_size_bytes": res.quant_size_bytes,
        "compression": res.compression, "bit_config": res.bit_config.to_dict(),
        "seconds": res.seconds, "notes": res.notes,
        "versions": {"torch": torch_version, "python": platform.python_version()},
    }
