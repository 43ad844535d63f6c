"""`hilq devices list|check`: the inventory's devices, and whether each can be reached, with
its facts (OS, CPU and flags, memory, GPU, runtime versions, Python)."""

from __future__ import annotations

from hilq.devices import inventory
from hilq.devices.errors import DeviceError

from .output import write_json


def add_arguments(p):
    p.add_argument("action", choices=("list", "check"))
    p.add_argument("names", nargs="*", help="devices to check (default: all)")
    p.add_argument("--inventory", help="devices.toml (default: only `local`)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the result as JSON")


def _where(cfg: dict) -> str:
    if cfg["kind"] == "ssh":
        return f"{cfg.get('user')}@{cfg['host']}:{cfg.get('port', 22)}"
    return "this machine"


def run(args) -> int:
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
