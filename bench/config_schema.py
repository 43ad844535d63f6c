"""JSON Schema (draft 2020-12) for the nightly config and the device inventory, and a
Markdown reference of every key, built at run time from what the loaders check.

The nightly config's tables, keys and types are `bench.config.table_keys()` and the field
types `_check_types` holds them to (pydantic's own JSON Schema of each); a key's description
is the comment beside its field (or `config.NOTES`), its default the field's. The inventory's
are `devices.inventory.KEYS` and `REQUIRED`. Nothing here lists a key, so a key added to a
dataclass or to `KEYS` appears in the schema and the reference without an edit here.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from dataclasses import MISSING, fields

from . import config

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _doc(obj) -> str:
    """The first paragraph of a docstring, on one line."""
    text = inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0]
    return " ".join(text.split())


def _comment_rows(src: str) -> dict[int, tuple[str, bool]]:
    """row -> (comment text, whether the row holds nothing but the comment)."""
    lines = src.splitlines()
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            out[row] = (tok.string[1:], lines[row - 1].lstrip().startswith("#"))
    return out


def _continues(text: str) -> bool:
    """`#      more words` under a field's trailing comment carries that comment on."""
    return text.startswith("  ")


@functools.cache
def comments(cls) -> dict[str, str]:
    """field -> the comment beside it in `cls`'s source: the lines just above the field, its
    trailing comment and that comment's indented continuation lines. The code documents its
    keys there, so the reference reads them there rather than from a second copy."""
    src = textwrap.dedent(inspect.getsource(cls))
    rows = _comment_rows(src)
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, r = [], node.lineno - 1
        while r in rows and rows[r][1] and not _continues(rows[r][0]):
            above.insert(0, rows[r][0])
            r -= 1
        beside, r = [], node.end_lineno
        if r in rows and not rows[r][1]:
            beside.append(rows[r][0])
            while r + 1 in rows and rows[r + 1][1] and _continues(rows[r + 1][0]):
                beside.append(rows[r + 1][0])
                r += 1
        words = " ".join(" ".join(above + beside).split())
        if words:
            out[node.target.id] = words
    return out


def describe(table: str, key: str, cls) -> str:
    """A key's description: its field's comment, else `config.NOTES`; the model door's keys
    of [[search]] are described once, on [[bench]]."""
    said = comments(cls).get(key) or config.NOTES.get(table, {}).get(key)
    if not said and issubclass(cls, config._ModelDoor):
        said = comments(config.Bench).get(key)
    return said or ""


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _property(table: str, key: str, cls) -> tuple[dict, bool]:
    """(the JSON Schema of one key, whether it is required): the type `_check_types` checks
    it against (pydantic's schema of it), or the shapes `_door` reshapes."""
    from pydantic import TypeAdapter

    hint = typing.get_type_hints(cls)[key]
    f = next(f for f in fields(cls) if f.name == key)
    prop = dict(config._RESHAPED.get(key) or TypeAdapter(hint).json_schema())
    if said := describe(table, key, cls):
        prop["description"] = said
    default = _default(f)
    if default is not MISSING:
        prop["default"] = TypeAdapter(hint).dump_python(default, mode="json")
    return prop, default is MISSING


def _table(table: str, keys: dict[str, type], doc: str) -> dict:
    props, required = {}, []
    for key, cls in keys.items():
        props[key], needed = _property(table, key, cls)
        if needed:
            required.append(key)
    out = {"type": "object", "description": doc, "properties": props,
           "additionalProperties": False}
    return {**out, "required": required} if required else out


def nightly() -> dict:
    """The nightly config's schema: the top level, and a `$defs` entry per nested table
    ([protocol] a table, [[bench]] and [[search]] arrays of them, as `Config` types them)."""
    keys = config.table_keys()
    top = _table("config", keys["config"], _doc(config.Config))
    hints, defs = typing.get_type_hints(config.Config), {}
    for name in config._TABLES:
        hint = hints[name]
        many = typing.get_origin(hint) is tuple
        cls = typing.get_args(hint)[0] if many else hint
        defs[name] = _table(name, keys[name], _doc(cls))
        ref = {"$ref": f"#/$defs/{name}"}
        top["properties"][name] = {"type": "array", "items": ref} if many else ref
    return {"$schema": DRAFT, "title": "hilq nightly config", **top, "$defs": defs}


_JSON = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
         dict: "object"}


def _json_type(typ) -> dict:
    """`KEYS`' Python type(s) -> JSON Schema; int or float is a number."""
    names = [_JSON[t] for t in (typ if isinstance(typ, tuple) else (typ,))]
    if set(names) == {"integer", "number"}:
        names = ["number"]
    return {"type": names[0] if len(names) == 1 else names}


def _examples(doc: str) -> dict[str, tuple[object, str]]:
    """key -> (example value, its comment) from the `key = value  # comment` lines of the
    inventory's docstring, where the inventory documents its keys."""
    import tomllib

    out = {}
    for m in re.finditer(r"^\s+(\w+) = (.+?)(?:\s+#\s*(.*))?$", doc, re.M):
        try:
            out[m[1]] = (tomllib.loads(f"v = {m[2]}")["v"], m[3] or "")
        except tomllib.TOMLDecodeError:
            continue
    return out


# the class `devices.inventory.open_device` builds for each kind: its keyword defaults are
# the defaults of the kind's keys (a kind missing here is described without defaults)
_DEVICE_CLASSES = {"local": ("hilq.devices.local", "LocalDevice"), "ssh": ("hilq.devices.ssh", "SSHDevice")}


def _device_defaults(kind: str) -> dict:
    import importlib

    if kind not in _DEVICE_CLASSES:
        return {}
    module, name = _DEVICE_CLASSES[kind]
    init = inspect.signature(getattr(importlib.import_module(module), name))
    return {k: list(p.default) if isinstance(p.default, tuple) else p.default
            for k, p in init.parameters.items()
            if p.default is not inspect.Parameter.empty and p.default is not None}


def _default_kind(inv) -> str | None:
    """The kind an entry without `kind` gets, as `validate` decides it."""
    try:
        return inv.validate("_", {})["kind"]
    except Exception:  # noqa: BLE001 — no kind works without keys: `kind` is always required
        return None


def _kind(inv, kind: str, default_kind: str | None) -> dict:
    """One kind's [devices.NAME] table: `KEYS[kind]` typed, `REQUIRED[kind]` required."""
    examples, defaults = _examples(inv.__doc__ or ""), _device_defaults(kind)
    props = {}
    for key, typ in inv.KEYS[kind].items():
        if key == "kind":
            props[key] = {"const": kind, "description": "which kind of device: "
                          f"{' | '.join(inv.KEYS)}" + (f" (default {default_kind})"
                                                      if default_kind else "")}
            continue
        example, said = examples.get(key, (None, ""))
        props[key] = {**_json_type(typ), **({"description": said} if said else {})}
        if key in defaults:
            props[key]["default"] = defaults[key]
        elif example is not None:
            props[key]["examples"] = [example]
    required = [*([] if kind == default_kind else ["kind"]), *inv.REQUIRED[kind]]
    out = {"type": "object", "properties": props, "additionalProperties": False}
    return {**out, "required": required} if required else out


def inventory() -> dict:
    """The device inventory's schema: `[devices.NAME]` tables, each exactly one kind's."""
    from hilq.devices import inventory as inv

    default_kind = _default_kind(inv)
    defs = {kind: _kind(inv, kind, default_kind) for kind in inv.KEYS}
    devices = {"type": "object", "description": "one [devices.NAME] table per device",
               "additionalProperties": {"oneOf": [{"$ref": f"#/$defs/{k}"} for k in defs]}}
    return {"$schema": DRAFT, "title": "hilq device inventory", "description": _doc(inv),
            "type": "object", "properties": {"devices": devices},
            "additionalProperties": False, "$defs": defs}


SCHEMAS = {"nightly": nightly, "inventory": inventory}


# ---- the Markdown reference, rendered from the schemas above ----------------------------

_WORDS = {"number": "number", "object": "table", "boolean": "boolean", "string": "string",
          "integer": "integer", "array": "array"}


def _type_text(p: dict) -> str:
    """A property's schema in TOML's words: `string`, `array of integer`, `table`, ..."""
    if "const" in p:
        return f'`"{p["const"]}"`'
    if "anyOf" in p:
        return " or ".join(_type_text(x) for x in p["anyOf"] if x.get("type") != "null")
    t = p.get("type")
    if isinstance(t, list):
        return " or ".join(_WORDS.get(x, x) for x in t)
    if t == "array" and p.get("items"):
        return f"array of {_type_text(p['items'])}"
    return _WORDS.get(t, str(t))


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: `|` would end the cell, `<cmd>` read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _rows(table: dict) -> list[str]:
    """One Markdown row per key of a table: key, type, default, description."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, p in table["properties"].items():
        if "$ref" in p or "$ref" in p.get("items", {}):
            continue                            # a nested table: a section of its own
        if key in table.get("required", ()):
            default = "required"
        elif "default" in p:
            default = "unset" if p["default"] is None else f"`{json.dumps(p['default'])}`"
        else:
            default = "—"
        said = p.get("description", "")
        if p.get("examples"):
            said += f"{'; ' if said else ''}e.g. `{json.dumps(p['examples'][0])}`"
        rows.append(f"| `{key}` | {_cell(_type_text(p))} | {default} | {_cell(said)} |")
    return rows


def _section(title: str, table: dict) -> list[str]:
    said = table.get("description")
    return [f"### {title}", "", *([_cell(said), ""] if said else []), *_rows(table), ""]


HEADER = """# Config reference

Every key of a nightly config (`hilq nightly --config FILE`) and of a device inventory
(`--inventory devices.toml`): its type, default and description. Generated from what the
loaders check (`bench/config.py`, `devices/inventory.py`) by
`hilq config reference --out docs/config-reference.md`; `hilq config schema nightly` and
`hilq config schema inventory` print the same as JSON Schema. Do not edit this page: a test
fails when it differs from what the command prints.
"""


def reference() -> str:
    """The whole reference page, nightly config then inventory."""
    night, inv = nightly(), inventory()
    out = [HEADER, "## Nightly config", "", *_section("Top level", night)]
    for name, p in night["properties"].items():
        if "$ref" in p:
            out += _section(f"[{name}]", night["$defs"][name])
        elif "$ref" in p.get("items", {}):
            out += _section(f"[[{name}]]", night["$defs"][name])
    out += ["## Device inventory", "", _cell(inv["description"]), ""]
    for kind, table in inv["$defs"].items():
        out += _section(f'[devices.NAME] of kind "{kind}"', table)
    return "\n".join(out).rstrip("\n") + "\n"
