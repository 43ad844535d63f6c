"""`hilq runtimes`: the runtimes available on this machine, their versions and precisions.

    hilq runtimes [--json OUT]

A runtime whose engine is missing (ImportError from its `version()`, e.g. no GPU for
torch-cuda) is listed as "not available: <reason>", not hidden: the table answers "why can't I
bench X here" as well as "what can I bench". Exit 0 always (absence is a fact, not an error).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from devices.runtimes import NAMES, module_name

from .cli import console as cli_console


def add_arguments(parser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the list as JSON")


def probe(name: str) -> dict:
    """{name, available, version, precisions, reason} for one runtime."""
    row = {"name": name, "available": False, "version": None, "precisions": {}, "reason": None}
    try:
        mod = importlib.import_module(f"devices.runtimes.{module_name(name)}")
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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runtimes": rows}, indent=2) + "\n")
    from rich.table import Table

    table = Table(title="Runtimes on this machine")
    for col in ("runtime", "version", "conv", "linear"):
        table.add_column(col)
    for r in rows:
        if r["available"]:
            p = r["precisions"]
            table.add_row(r["name"], r["version"], ", ".join(p.get("conv", [])),
                          ", ".join(p.get("linear", [])))
        else:
            table.add_row(r["name"], f"[dim]{r['reason']}[/dim]", "", "")
    cli_console().print(table)
    return 0
