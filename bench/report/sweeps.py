"""Section builders for shape sweeps (`hilq bench --batch` / `--seq-len`): latency and
throughput against one axis, per variant, and INT8's speed-up over FP32 at each point,
measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass

from . import plots
from .data import Result, RunData
from .model import Plot, Table, Text, fmt


@dataclass(frozen=True)
class SweepAxis:
    """One shape axis a bench can sweep (`--batch`, `--seq-len`): the protocol key that
    records each measurement's point, and the words its report section uses. `per_token`:
    work per call grows with the point (tokens = batch × length), so the section reports
    ms per token and tokens/s; otherwise ms per sample and samples/s."""

    key: str
    name: str
    flag: str
    png: str
    per_token: bool = False


BATCH = SweepAxis("batch", "batch", "--batch 1,8,32", "batch_sweep")
SEQ_LEN = SweepAxis("seq_len", "sequence length", "--seq-len 16,64,128", "seq_len_sweep",
                    per_token=True)


def batch_sweep(d: RunData) -> list:
    return sweep(d.results, BATCH)


def seq_len_sweep(d: RunData) -> list:
    return sweep(d.results, SEQ_LEN)


def _shape_of(r: Result) -> dict:
    """The measurement's shape point: its protocol's batch and sequence length (0: the
    model's own length, not swept)."""
    p = (r.ok_rows or r.rows)[0].get("protocol") or {}
    return {"batch": int(p.get("batch") or 1), "seq_len": int(p.get("seq_len") or 0)}


def _groups(results: list[Result], axis: SweepAxis) -> dict[tuple, dict[int, Result]]:
    """(model, variant without its `@...` shape suffix, device, runtime, the other axes'
    points) -> {point on `axis`: result}; a product sweep gives one curve per other point."""
    groups: dict[tuple, dict[int, Result]] = {}
    for r in results:
        if r.ok_rows:
            shape = _shape_of(r)
            x = shape.pop(axis.key)
            key = (r.model, r.variant.split("@", 1)[0], r.device, r.runtime,
                   tuple(sorted(shape.items())))
            groups.setdefault(key, {})[x] = r
    return groups


def _curve(key: tuple) -> str:
    """A curve's variant, with the other axis when it was set: `w8a8`, `w8a8 b8`, `fp32 s64`."""
    rest = [f"{'b' if k == 'batch' else 's'}{v}" for k, v in key[4]
            if v and not (k == "batch" and v == 1)]
    return " ".join([key[1], *rest])


def _rate_of(axis: SweepAxis, x: int, r: Result) -> float | None:
    """Throughput in the section's unit: samples/s as measured, or tokens/s = sequences/s × x."""
    rate = r.median_of("throughput")
    return rate * x if axis.per_token and rate else rate


def _row(axis: SweepAxis, key: tuple, x: int, r: Result, fp32: Result | None) -> list:
    p50 = r.stat("p50")
    units = x * dict(key[4]).get("batch", 1) if axis.per_token else x   # per call
    gain = (f"{fp32.stat('p50') / p50:.2f}×" if fp32 is not None and key[1] != "fp32" and p50
            and fp32.stat("p50") else "–")
    rate = _rate_of(axis, x, r)
    return [key[0], _curve(key), f"{key[2]}/{key[3]}", x, fmt(p50),
            fmt(p50 / units if p50 else None), "–" if rate is None else f"{rate:.1f}", gain]


def sweep(results: list[Result], axis: SweepAxis) -> list:
    groups = _groups(results, axis)
    swept = {k: v for k, v in groups.items() if len(v) > 1}
    if not swept:
        return [Text(f"No {axis.name} sweep in this run (`hilq bench {axis.flag}`).")]
    unit = "token" if axis.per_token else "sample"
    rows = []
    for key, per in swept.items():
        fp32 = groups.get((key[0], "fp32", *key[2:]), {})
        rows += [_row(axis, key, x, r, fp32.get(x)) for x, r in sorted(per.items())]
    curves = [(f"{key[0]} {_curve(key)} · {key[2]}/{key[3]}", sorted(per),
               [per[x].stat("p50") for x in sorted(per)],
               [_rate_of(axis, x, per[x]) for x in sorted(per)]) for key, per in swept.items()]
    return [Text(f"Each {axis.name} measured in its own alternating rounds"
                 + (", each length its own static-shape artifact" if axis.per_token else "")
                 + f"; latency is per call, throughput is {unit}s/s over the timed window"
                 + (" (sequences/s × length)." if axis.per_token else ".")),
            Table(["model", "variant", "device", axis.name, "p50 ms / call", f"ms / {unit}",
                   f"{unit}s/s", f"× fp32 (same {axis.name})"], rows),
            Plot(axis.png, plots.png(plots.sweep(curves, axis.name, unit)))]
