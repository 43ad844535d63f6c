"""`hilq config schema|reference`: what a config may say, generated from what the loaders
check (bench/config_schema.py), so an editor, a CI check or a reader never works from a
list that has drifted from the code.

    hilq config schema [nightly|inventory] [--out FILE]   # JSON Schema, draft 2020-12
    hilq config reference [--out FILE]                    # Markdown: every table and key

Results go to stdout (or FILE); a FILE that cannot be written is one line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserError


def add_arguments(p) -> None:
    from .config_schema import SCHEMAS

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    schema = sub.add_parser("schema", help="print the JSON Schema of a nightly config or a "
                                           "device inventory")
    schema.add_argument("what", nargs="?", default="nightly", choices=tuple(SCHEMAS),
                        help="which file's schema (default nightly)")
    ref = sub.add_parser("reference", help="print the Markdown reference of every table and key")
    for q in (schema, ref):
        q.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")


def _emit(text: str, out: str | None, quiet: bool) -> None:
    """`text` on stdout, or in `out` (its folder made): a path that cannot be written is
    the user's to fix, one line."""
    if not out:
        sys.stdout.write(text)
        return
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    except OSError as e:
        where = f"{e.filename}: " if e.filename and str(e.filename) != out else ""
        raise UserError(f"--out {out}: cannot write ({where}{e.strerror or type(e).__name__})"
                        ) from None
    if not quiet:
        print(f"wrote {out}", file=sys.stderr)


def run(args) -> int:
    from . import config_schema

    if args.action == "schema":
        text = json.dumps(config_schema.SCHEMAS[args.what](), indent=2) + "\n"
    else:
        text = config_schema.reference()
    _emit(text, args.out, getattr(args, "quiet", False))
    return 0
