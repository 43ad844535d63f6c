"""`hilq devices list|check|gpu`: the inventory's devices, and whether each can be reached,
with its facts (OS, CPU and flags, memory, GPU, runtime versions, Python); `gpu` runs every
GPU path of hilq on this machine's GPU and judges each (bench/gpu_check.py)."""

from __future__ import annotations

import sys

from hilq.devices import inventory
from hilq.devices.errors import DeviceError

from .output import write_json


def add_arguments(p):
    p.add_argument("action", choices=("list", "check", "gpu"),
                   help="list the inventory, check each device's reach and facts, or check "
                        "every GPU path here (torch-cuda FP16/BF16/INT8/INT4, device time, "
                        "NVML energy, integer kernels; exit 1 on any failure)")
    p.add_argument("names", nargs="*", help="devices to check (default: all)")
    p.add_argument("--inventory", help="devices.toml (default: only `local`)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the result as JSON")


def _where(cfg: dict) -> str:
    if cfg["kind"] == "ssh":
        return f"{cfg.get('user')}@{cfg['host']}:{cfg.get('port', 22)}"
    return "this machine"


def _gpu(args) -> int:
    from dataclasses import asdict

    from .gpu_check import NOT_RUN, gpu_check

    got = gpu_check(say=lambda s: print(s, file=sys.stderr))
    head = ("model", "variant", "host p50 ms", "device p50 ms", "× fp16", "mJ/inf", "check")
    print(" | ".join(head))
    for r in got:
        cells = (r.model, r.variant, r.host_ms, r.device_ms, r.x_fp16, r.mj_per_inference,
                 "ok" if not r.problems else "; ".join(r.problems))
        print(" | ".join("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                         for v in cells))
    failed = sum(bool(r.problems) for r in got)
    print(f"{len(got) - failed} of {len(got)} GPU paths passed\n{NOT_RUN}")
    write_json(args.json_out, {"gpu": [asdict(r) for r in got], "tensorrt": NOT_RUN})
    return 1 if failed or not got else 0


def run(args) -> int:
    if args.action == "gpu":
        return _gpu(args)
    devs = inventory.load(args.inventory)
    names = args.names or sorted(devs)
    for n in names:
        if n not in devs:
            raise DeviceError("bad_input", f"unknown device {n!r} (known: {', '.join(sorted(devs))})")
    rows, code = [], 0
    for name in names:
        cfg = devs[name]
        row = {"name": name, "kind": cfg["kind"], "where": _where(cfg),
               "runtimes": cfg.get("runtimes", ["ort"]), "power": cfg.get("power", "none")}
        if args.action == "check":
            dev = inventory.open_device(name, devs)
            try:
                facts = dev.facts()
                row.update(status="ok", facts=facts)
                cpu = facts.get("cpu", {})
                flags = ",".join(f for f, on in cpu.get("flags", {}).items() if on) or "-"
                vers = ", ".join(f"{r} {v or 'missing'}" for r, v in facts.get("runtimes", {}).items())
                print(f"{name:12} ok    {cpu.get('model')} ({cpu.get('logical_cores')} cores; "
                      f"{flags}); {facts.get('memory_gb')} GB; python {facts.get('python')}; {vers}")
            except DeviceError as e:
                row.update(status="failed", failure=e.kind, reason=str(e))
                print(f"{name:12} FAIL  {e.kind}: {e}")
                code = 1
            finally:
                dev.close()
        else:
            print(f"{name:12} {cfg['kind']:6} {row['where']:28} runtimes={','.join(row['runtimes'])}"
                  f" power={row['power']}")
        rows.append(row)
    write_json(args.json_out, {"devices": rows})
    return code
