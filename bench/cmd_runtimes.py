"""`hilq runtimes`: the runtimes available on this machine, their versions, precisions, the
artifact each consumes and the engine settings it takes (`--runtime-option key=value`).

    hilq runtimes [--json OUT]

A runtime whose engine is missing (ImportError from its `version()`, e.g. no GPU for
torch-cuda) is listed as "not available: <reason>", not hidden: the table answers "why can't I
bench X here" as well as "what can I bench". Exit 0 always (absence is a fact, not an error).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict

from hilq.devices.runtimes import NAMES, module_name

from .cli import console as cli_console
from .output import write_json


def add_arguments(parser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the list as JSON")


def probe(name: str) -> dict:
    """{name, available, version, precisions, consumes, options, reason} for one runtime."""
    row = {"name": name, "available": False, "version": None, "precisions": {}, "reason": None}
    try:
        mod = importlib.import_module(f"hilq.devices.runtimes.{module_name(name)}")
        row["consumes"] = asdict(mod.CONSUMES)
        row["options"] = {k: {"type": o.type.__name__, "default": o.default, "help": o.help,
                              **({"choices": list(o.choices)} if o.choices else {})}
                          for k, o in mod.OPTIONS.items()}
        row["precisions"] = mod.precisions()
        row["version"] = mod.version()
        row["available"] = True
    except ImportError as e:
        row["reason"] = f"not available: {e}"
    except Exception as e:  # noqa: BLE001 — a broken engine is reported, not raised
        row["reason"] = f"not available: {type(e).__name__}: {e}"
    return row


def run(args) -> int:
    rows = [probe(name) for name in NAMES]
    write_json(args.json, {"runtimes": rows})
    from rich.table import Table

    table = Table(title="Runtimes on this machine")
    for col in ("runtime", "version", "conv", "linear", "consumes"):
        table.add_column(col)
    for r in rows:
        c = r.get("consumes") or {}
        what = f"{c.get('format')} ({c.get('activations')}, {c.get('device')})" if c else ""
        if r["available"]:
            p = r["precisions"]
            table.add_row(r["name"], r["version"], ", ".join(p.get("conv", [])),
                          ", ".join(p.get("linear", [])), what)
        else:
            table.add_row(r["name"], f"[dim]{r['reason']}[/dim]", "", "", what)
    out = cli_console()
    out.print(table)
    opts = Table(title="Runtime options (--runtime-option KEY=VALUE)")
    for col in ("runtime", "option", "type", "default", "what"):
        opts.add_column(col)
    for r in rows:
        for k, o in (r.get("options") or {}).items():
            kind = o["type"] + (f": {' | '.join(map(str, o['choices']))}" if o.get("choices") else "")
            opts.add_row(r["name"], k, kind, repr(o["default"]), o["help"])
    out.print(opts)
    return 0
