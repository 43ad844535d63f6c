"""The GPU check (`hilq devices gpu`): every GPU path hilq has, on this machine's GPU, in one
run. torch-cuda FP16, BF16, INT8 (`torch._int_mm`) and INT4 weight-only, each against FP16
of the same model measured in the same run, on resnet50 and tiny-transformer, through the
bench verb; per row: the run is ok, CUDA-event device time sits within [0.5, 1.05]× the host
time (it cannot exceed wall time; far below it, the timer missed work), NVML energy per
inference has its idle baseline, and an integer variant ran integer kernels in every layer
by the engine's own report. TensorRT does not install on the lent machines: not run, and
said so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hilq.measurement import Protocol

from .benchmark import BenchOptions, bench
from .errors import UserError

MODELS = ("resnet50", "tiny-transformer")
VARIANTS = ("fp16", "bf16", "w8a8", "w4a16")
KERNEL = {"w8a8": "_int_mm", "w4a16": "_weight_int4pack_mm"}   # the integer kernel per variant
PROTOCOL = Protocol(min_duration_s=1.0, power="nvml", idle_s=2.0)
NOT_RUN = "TensorRT: not run (no TensorRT wheel here); its runtime follows the documented API"


def check(m: dict) -> list[str]:
    """What is wrong with one measurement (`Measurement.to_dict()`) of a GPU path."""
    if m["status"] == "failed":
        return [f"{m['failure']}: {m['reason']}"]
    bad = []
    host = (m.get("latency_ms") or {}).get("p50")
    dev = (m.get("device_latency_ms") or {}).get("p50")
    if dev is None:
        bad.append("no CUDA-event device time")
    elif host and not 0.5 <= dev / host <= 1.05:
        bad.append(f"device/host p50 {dev / host:.2f} outside [0.5, 1.05]")
    power = m.get("power") or {}
    if m.get("energy_j_per_inference") is None or power.get("idle_w") is None:
        bad.append(f"no NVML energy with idle baseline ({power.get('reason') or 'no reading'})")
    want, k = KERNEL.get(m["variant"]), m.get("kernels") or {}
    if want and not k.get("integer"):
        bad.append(f"no layer ran {want} (the engine's report: {k})")
    elif want and k.get("float"):
        bad.append(f"{len(k['float'])} layer(s) stayed float: {', '.join(k['float'][:3])}")
    return bad


@dataclass
class GpuRow:
    model: str
    variant: str
    host_ms: float | None
    device_ms: float | None
    x_fp16: float | None                 # FP16's host p50 over this one's, same run
    mj_per_inference: float | None
    problems: list[str]


def rows(ms: list[dict]) -> list[GpuRow]:
    """One model's measurements -> its rows, each judged by `check`."""
    fp16 = next(((m.get("latency_ms") or {}).get("p50") for m in ms
                 if m["variant"] == "fp16" and m["status"] != "failed"), None)
    out = []
    for m in ms:
        lat, dev, e = m.get("latency_ms") or {}, m.get("device_latency_ms") or {}, \
            m.get("energy_j_per_inference")
        out.append(GpuRow(m["model"], m["variant"], lat.get("p50"), dev.get("p50"),
                          fp16 / lat["p50"] if fp16 and lat.get("p50") else None,
                          None if e is None else 1000 * e, check(m)))
    return out


def gpu_check(models=MODELS, say: Callable[[str], None] = print) -> list[GpuRow]:
    """Bench every GPU variant of each model on torch-cuda (2 rounds, NVML meter, nothing
    stored) and judge each row; a machine without CUDA is a one-line error."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA device visible to PyTorch here: nothing to check")
    from hilq.quant.models import ModelRef

    out = []
    for model in models:
        say(f"{model}: {', '.join(VARIANTS)} on torch-cuda")
        res = bench(ModelRef(model), BenchOptions(variants=VARIANTS, runtime="torch-cuda",
                                                  rounds=2, protocol=PROTOCOL, store=False),
                    say=say)
        out += rows([m.to_dict() for m in res.measurements])
    return out
