"""`Measurement` <-> `measurements` row: one explicit map, used in both directions.

Every field is kept. A field with its own column (`COLUMNS`) is written there whole (JSON for
dicts and lists) and read back from it; `facts` live once per device in `devices`; any other
field, `profile`, `scenario`, `memory` or one a newer agent adds, is kept in `extra`. Query
columns (`p50_ms`, `top1`, `scenario_valid`, ...) are derived from the fields on the way in
(`DERIVED`) and never read back: the fields they come from are the truth.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from hilq.measurement import Measurement

from .connection import dumps

# Measurement field -> the column that holds it whole.
COLUMNS = {
    "model": "model", "variant": "variant", "device": "device", "runtime": "runtime",
    "status": "status", "reason": "reason", "failure": "failure",
    "latency_ms": "latency", "samples_ms": "samples_ms", "device_latency_ms": "device_latency",
    "throughput": "throughput", "energy_j_per_inference": "energy_j", "power": "power",
    "kernels": "kernels", "protocol": "protocol", "load": "load",
    "artifact_sha256": "artifact_sha256", "outputs_check": "outputs_check",
    "harness_overhead_ms": "harness_overhead_ms", "timing": "timing", "rounds": "rounds",
    "accuracy": "accuracy",
}
JSON_FIELDS = {"latency_ms", "samples_ms", "device_latency_ms", "power", "kernels", "protocol",
               "load", "outputs_check", "timing", "rounds", "accuracy"}
NUMBER_FIELDS = {"throughput", "energy_j_per_inference", "harness_overhead_ms"}
# Query column -> (field, key): a number (or flag) inside a dict field, copied out for SQL.
DERIVED = {
    **{f"{s}_ms": ("latency_ms", s) for s in ("p50", "p90", "p99", "mean", "std", "min", "max")},
    "avg_power_w": ("power", "avg_w"), "busy": ("load", "busy"),
    "top1": ("accuracy", "top1"), "agreement_fp32": ("accuracy", "agreement_fp32"),
    "eval_sha256": ("accuracy", "eval_sha256"),
    "load_peak_mb": ("memory", "load_peak_mb"), "timed_peak_mb": ("memory", "timed_peak_mb"),
    "scenario": ("scenario", "scenario"), "scenario_valid": ("scenario", "valid"),
    "scenario_value": ("scenario", "value"),
}


def _same(v):
    return v


# How a derived column takes its value (default: as_float).
CAST = {"eval_sha256": _same, "scenario": _same, "scenario_valid": _same, "busy": bool}
_NOT_EXTRA = set(COLUMNS) | {"facts"}
_FIELDS = {f.name for f in dataclasses.fields(Measurement)}
_FACTORY = {f.name: f.default_factory for f in dataclasses.fields(Measurement)
            if f.default_factory is not dataclasses.MISSING}


class Key(NamedTuple):
    """A measurement's natural key within a run."""

    model: str
    variant: str
    device: str
    runtime: str
    kind: str
    round: int


def to_row(m: Measurement) -> dict:
    """The columns of `m` (all but the key's run, kind and round, and the foreign keys)."""
    row = {}
    for f, col in COLUMNS.items():
        v = getattr(m, f)
        row[col] = (dumps(_json_value(f, v)) if f in JSON_FIELDS
                    else as_float(v) if f in NUMBER_FIELDS else v)
    for col, (f, key) in DERIVED.items():
        row[col] = CAST.get(col, as_float)((getattr(m, f) or {}).get(key))
    row["n_samples"] = len(m.samples_ms or []) or as_int((m.latency_ms or {}).get("n"))
    extra = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
             if f.name not in _NOT_EXTRA and getattr(m, f.name) not in (None, {}, [])}
    row["extra"] = dumps(extra or None)
    return row


def from_row(row: dict, facts: dict | None = None) -> Measurement:
    """The `Measurement` a decoded row holds (JSON columns already parsed), `facts` from its
    device; fields kept in `extra` that this hilq's Measurement lacks are left out."""
    values = {f: row[col] if row[col] is not None or f not in _FACTORY else _FACTORY[f]()
              for f, col in COLUMNS.items()}
    extra = {k: v for k, v in (row.get("extra") or {}).items() if k in _FIELDS}
    return Measurement(**{**extra, **values, "facts": facts or {}})


def key_of(row: dict) -> Key:
    return Key(*(row[k] for k in Key._fields))


def _json_value(field: str, value):
    if field == "samples_ms":
        return list(value or [])
    return (value or None) if field == "accuracy" else value


def as_float(x) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def as_int(x) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None
