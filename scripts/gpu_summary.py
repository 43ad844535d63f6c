"""The summary table of scripts/gpu_check.sh: one row per (model, variant) from `hilq bench
--json`, and a non-zero exit when any GPU path fails its check.

    python scripts/gpu_summary.py OUT/resnet50.json OUT/tiny-transformer.json

Checks, per row: the run is ok; CUDA-event device time is there and within [0.5, 1.05]× the
host time (device time cannot exceed wall time; far below it means the timer missed work);
NVML energy per inference is there with an idle baseline; an integer variant ran integer
kernels in every layer (w8a8: `_int_mm`, w4a16: `_weight_int4pack_mm`; the runtime's own
per-layer report), and
each variant's speed is given against FP16 of the same model, measured in the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KERNEL = {"w8a8": "_int_mm", "w4a16": "_weight_int4pack_mm"}


def check(m: dict) -> list[str]:
    bad = []
    if m["status"] == "failed":
        return [f"{m['failure']}: {m['reason']}"]
    host = (m.get("latency_ms") or {}).get("p50")
    dev = (m.get("device_latency_ms") or {}).get("p50")
    if dev is None:
        bad.append("no CUDA-event device time")
    elif host and not 0.5 <= dev / host <= 1.05:
        bad.append(f"device/host p50 {dev / host:.2f} outside [0.5, 1.05]")
    power = m.get("power") or {}
    if m.get("energy_j_per_inference") is None or power.get("idle_w") is None:
        bad.append(f"no NVML energy with idle baseline ({power.get('reason') or 'no reading'})")
    want = KERNEL.get(m["variant"])
    k = m.get("kernels") or {}
    if want and not k.get("integer"):
        bad.append(f"no layer ran {want} (the engine's report: {k})")
    elif want and k.get("float"):
        bad.append(f"{len(k['float'])} layer(s) stayed float: {', '.join(k['float'][:3])}")
    return bad


def main(paths: list[str]) -> int:
    rows, failed = [], 0
    for path in paths:
        ms = json.loads(Path(path).read_text())["measurements"]
        fp16 = next(((m.get("latency_ms") or {}).get("p50") for m in ms
                     if m["variant"] == "fp16" and m["status"] != "failed"), None)
        for m in ms:
            bad = check(m)
            failed += bool(bad)
            lat, dev = m.get("latency_ms") or {}, m.get("device_latency_ms") or {}
            e = m.get("energy_j_per_inference")
            speed = fp16 / lat["p50"] if fp16 and lat.get("p50") else None
            rows.append((m["model"], m["variant"], lat.get("p50"), dev.get("p50"), speed,
                         None if e is None else 1000 * e, "ok" if not bad else "; ".join(bad)))
    head = ("model", "variant", "host p50 ms", "device p50 ms", "× fp16", "mJ/inf", "check")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                         for v in r))
    print(f"{len(rows) - failed} of {len(rows)} GPU paths passed")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
