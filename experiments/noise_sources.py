"""Where the process-to-process noise comes from: the CV of p50 over fresh agent processes,
one protocol setting against another, on the same artifacts and in the same run.

    python -m experiments.noise_sources [--models resnet18:ort,resnet18:openvino,digits-cnn:ort]
        [--processes 10] [--settings default,pin2,pin1,warm3s] [--json out.json]

Each process is a fresh agent (as every nightly round is). The settings are interleaved
process by process (A B C A B C ...), so a drift of the machine reaches all of them alike.
Run it alone on a quiet machine; it prints one Markdown table and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from hilq.bench import runner
from hilq.devices.agent import cpu_facts
from hilq.devices.local import LocalDevice

from hilq.measurement import Protocol

BASE = Protocol(min_iters=50, min_duration_s=1.5)
SETTINGS = {   # name -> what changes from the default protocol
    "default": {},
    "pin2": {"affinity": (0, 1), "threads": 2},     # the agent and its pool on both cores
    "pin1": {"affinity": (1,), "threads": 1},       # one core, one thread: no migration
    "warm3s": {"warmup_s": 3.0},                    # allocator and caches settled longer
    "long6s": {"min_duration_s": 6.0},              # a longer window (more samples)
}


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    get = lambda k: next((ln.split(":", 1)[1].strip() for ln in info.splitlines()  # noqa: E731
                          if ln.startswith(k)), "?")
    flags = [f for f, on in cpu_facts()["flags"].items() if on]
    return (f"{get('model name')}, family {get('cpu family')} model {get('model')}, "
            f"{cpu_facts()['usable_cores']} cores, "
            f"flags {' '.join(flags)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18:ort,resnet18:openvino,digits-cnn:ort")
    ap.add_argument("--variant", default="w8a8")
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"noise_sources: unknown setting(s) {', '.join(unknown)} "
              f"(known: {', '.join(SETTINGS)})", file=sys.stderr)
        return 2
    device = LocalDevice()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            model, _, runtime = spec.partition(":")
            art = runner.artifact_for(model, args.variant, Path(tmp) / model, runtime or "ort")
            p50 = {n: [] for n in names}
            for k in range(args.processes):
                for n in names:
                    m = device.run(art, replace(BASE, **SETTINGS[n]), runtime or "ort")
                    if m.ok:
                        p50[n].append(m.latency_ms["p50"])
                    print(f"{model}/{runtime} {n} process {k + 1}: "
                          f"{m.latency_ms.get('p50', float('nan')):.3f} ms {m.status}",
                          file=sys.stderr, flush=True)
            for n in names:
                v = p50[n]
                cv = statistics.stdev(v) / statistics.mean(v) if len(v) > 1 else float("nan")
                rows.append({"model": model, "runtime": runtime, "setting": n, "n": len(v),
                             "median_ms": statistics.median(v) if v else None,
                             "min_ms": min(v, default=None), "max_ms": max(v, default=None),
                             "cv": cv})
            raw[spec] = p50
    print(f"CPU: {cpu_line()}\n")
    print("| model | runtime | setting | processes | median p50 ms | range ms | CV of p50 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['runtime']} | {r['setting']} | {r['n']} | "
              f"{r['median_ms']:.3f} | {r['min_ms']:.3f}–{r['max_ms']:.3f} | {r['cv']:.2%} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": rows, "p50": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
