"""The must-show matrix of issue 2: `hilq quantize` on a model (default `digits-cnn`) at FP32,
W8A8, W4A8, W4A4 and W2A8, for each calibration method (no repair) and each repair (min-max
calibration), plus one combination; printed as Markdown and written to `--out`.

    python -m experiments.quantize_table [--model digits-cnn] [--out table.md] [--json all.json]

Every cell is one `hilq quantize ... --json` run through `bench.cli.main`, so the table shows
exactly what the CLI reports. Cells are test top-1 in %, with the change from FP32 in points.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from hilq.bench.cli import main as hilq

VARIANTS = [(8, 8), (4, 8), (4, 4), (2, 8)]
CALIBS = ["minmax", "percentile", "mse", "entropy"]
REPAIRS = ["cle", "split", "bias", "adaround"]
COMBO = ("mse", "adaround")   # calibration method + repairs, the last column


def run_one(model: str, w: int, a: int, calib: str, repair: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        argv = ["quantize", "--model", model, "--w-bits", str(w), "--a-bits", str(a),
                "--calib", calib, "--json", str(out), *extra]
        if repair:
            argv += ["--repair", repair]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = hilq(argv)
        if rc != 0:
            raise SystemExit(f"hilq {' '.join(argv)} exited {rc}")
        return json.loads(out.read_text())


def cell(r: dict, best: float) -> str:
    acc, d = 100 * r["quant_top1"], 100 * r["top1_delta"]
    text = f"{acc:.1f} ({d:+.1f})"
    return f"**{text}**" if abs(r["quant_top1"] - best) < 1e-9 else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--out", help="write the Markdown table here too")
    p.add_argument("--json", help="write every run's JSON here")
    p.add_argument("--extra", default="", help="extra arguments for every run, e.g. '--seed 1'")
    args = p.parse_args(argv)
    extra = args.extra.split()
    columns = ([(c, "") for c in CALIBS] + [("minmax", r) for r in REPAIRS]
               + [(COMBO[0], ",".join(COMBO[1:]))])
    heads = ([f"{c}" for c in CALIBS] + [f"minmax + {r}" for r in REPAIRS]
             + [f"{COMBO[0]} + {'+'.join(COMBO[1:])}"])
    results, rows, fp32 = [], [], None
    t0 = time.perf_counter()
    for w, a in VARIANTS:
        runs = []
        for calib, repair in columns:
            r = run_one(args.model, w, a, calib, repair, extra)
            print(f"  w{w}a{a} {calib:10s} {repair or '-':9s} {100 * r['quant_top1']:6.2f}% "
                  f"({r['seconds']:.1f} s)", file=sys.stderr, flush=True)
            runs.append(r)
        results += runs
        fp32 = runs[0]["fp32_top1"]
        best = max(r["quant_top1"] for r in runs)
        rows.append(f"| W{w}A{a} | " + " | ".join(cell(r, best) for r in runs) + " |")
    lines = [f"`hilq quantize --model {args.model}`: test top-1 % (change from FP32 in points); "
             "weights symmetric per-channel, activations asymmetric per-tensor, "
             "calibrated on the real calibration split. Columns 1-4: calibration method, no "
             "repair. Columns 5-8: one repair with min-max calibration. Last column: "
             f"{COMBO[0]} calibration with {' + '.join(COMBO[1:])}. Best per row in bold.",
             "",
             "| variant | " + " | ".join(heads) + " |",
             "|---|" + "---:|" * len(heads),
             f"| FP32 | {100 * fp32:.1f} |" + " |" * (len(heads) - 1),
             *rows, "",
             f"({len(results)} runs in {time.perf_counter() - t0:.0f} s.)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
