"""Side-by-side CPU benchmark: one model, FP32 vs INT8, on ONNX Runtime, OpenVINO and PyTorch,
with ONNX Runtime's own `quantize_static` output of the same FP32 model as the peer.

    python -m experiments.bench_runtimes [--model resnet18] [--transformer tiny-transformer]
        [--rounds 3] [--warmup 10] [--min-iters 40] [--min-s 3] [--threads 2]
        [--out .cache/bench-runtimes] [--json OUT]

Every (runtime, file) is timed by the on-device agent (`devices/agent.py`) in its own fresh
process with the same protocol, in alternating rounds (each round runs every case once, the
order rotated per round), so drift on a shared machine falls on all cases alike; the spread
of the per-round medians is reported. ORT files are also timed by an independent one-process
timer (a plain `time.perf_counter` loop around `session.run`, no hilq code) as a check on the
harness. The Markdown table goes to stdout; `--json` keeps every round's raw result.

Run it alone on a quiet machine: the agent flags rounds in which other processes were busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "devices" / "agent.py"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")

INDEPENDENT = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
path, threads, warm, n_min, s_min = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    feeds[i.name] = (rng.standard_normal(shape).astype(np.float32) if "float" in i.type
                     else rng.integers(0, 8, size=shape).astype(np.int64))
for _ in range(warm):
    sess.run(None, feeds)
t, t0 = [], time.perf_counter()
while len(t) < n_min or time.perf_counter() - t0 < s_min:
    a = time.perf_counter(); sess.run(None, feeds); t.append((time.perf_counter() - a) * 1e3)
print(json.dumps({"p50": statistics.median(t), "n": len(t)}))
"""


@dataclass
class Case:
    label: str
    runtime: str
    path: str
    variant: str
    group: str                      # model: ratios are taken within a group
    independent: bool = False       # also time with the independent ORT loop
    rounds: list = field(default_factory=list)       # agent results, one per round
    indep: list = field(default_factory=list)        # independent p50 per round


def cpu_flags() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in CPU_FLAGS}


def peer_quantize(fp32: str, calib_x, out: Path, model: str):
    """ONNX Runtime's own static quantization of the same FP32 file: QDQ, U8 activations,
    S8 per-channel weights, MinMax calibration on the same calibration data as hilq, after
    ORT's recommended pre-processing (shape inference + graph optimisation)."""
    from hilq.quant.artifact import Artifact
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = out / f"{model}-peer-ort-quantize_static.onnx"
    if path.is_file() and Path(f"{path}.manifest.json").is_file():
        return Artifact.load(path)
    import onnxruntime as ort

    name = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    pre = out / f"{model}-peer-preprocessed.onnx"
    preprocessed = True
    try:
        quant_pre_process(fp32, str(pre))
    except Exception:  # noqa: BLE001 — recorded: the peer then quantizes the raw file
        pre, preprocessed = Path(fp32), False

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({name: x[None].numpy()} for x in calib_x)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return Artifact.create(path, model=model, variant="w8a8", target="cpu",
                           format="onnx-qdq", producer="onnxruntime.quantization.quantize_static",
                           settings={"quant_format": "QDQ", "activations": "QUInt8",
                                     "weights": "QInt8 per-channel", "calibrate": "MinMax",
                                     "calib_samples": len(calib_x),
                                     "quant_pre_process": preprocessed},
                           versions={"onnxruntime": ort.__version__})


def build_cases(args, out: Path) -> list[Case]:
    from hilq.quant.export import build_artifact
    from hilq.quant.export_torch import build as build_torch
    from hilq.quant.models import load_model

    m = args.model
    fp32 = build_artifact(m, "fp32", out, target="cpu")
    w8a8 = build_artifact(m, "w8a8", out, target="cpu")
    peer = peer_quantize(fp32.path, load_model(m).data().calib_x, out, m)
    cases = [Case(f"{m} FP32 · ort", "ort", fp32.path, "fp32", m, True),
             Case(f"{m} hilq W8A8 · ort", "ort", w8a8.path, "w8a8", m, True),
             Case(f"{m} peer W8A8 (ORT quantize_static) · ort", "ort", peer.path, "w8a8", m,
                  True),
             Case(f"{m} FP32 · openvino", "openvino", fp32.path, "fp32", m),
             Case(f"{m} hilq W8A8 · openvino", "openvino", w8a8.path, "w8a8", m),
             Case(f"{m} peer W8A8 · openvino", "openvino", peer.path, "w8a8", m)]
    if not args.no_torch:
        tf, tq = build_torch(m, "fp32", out), build_torch(m, "w8a8", out)
        cases += [Case(f"{m} FP32 · torch (compile)", "torch", tf.path, "fp32", m),
                  Case(f"{m} W8A8 PT2E · torch (compile)", "torch", tq.path, "w8a8", m)]
    if args.transformer != "none":
        t = args.transformer
        tf32 = build_artifact(t, "fp32", out, target="cpu")
        t4 = build_artifact(t, "w4a16", out, target="cpu")
        cases += [Case(f"{t} FP32 · ort", "ort", tf32.path, "fp32", t, True),
                  Case(f"{t} hilq W4A16 · ort", "ort", t4.path, "w4a16", t, True),
                  Case(f"{t} FP32 · openvino", "openvino", tf32.path, "fp32", t),
                  Case(f"{t} hilq W4A16 · openvino", "openvino", t4.path, "w4a16", t)]
    return cases


def run_agent(case: Case, protocol: dict, log) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(protocol, f)
    try:
        proc = subprocess.run([sys.executable, str(AGENT), "--artifact", case.path,
                               "--protocol", f.name, "--runtime", case.runtime],
                              capture_output=True, text=True, timeout=1800)
    finally:
        os.unlink(f.name)
    log.write(f"--- {case.label}\n{proc.stderr}\n")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"status": "failed", "reason": f"agent exit {proc.returncode}, no JSON"}


def run_independent(case: Case, args, log) -> float | None:
    proc = subprocess.run([sys.executable, "-c", INDEPENDENT, case.path, str(args.threads),
                           str(args.warmup), str(args.min_iters), str(args.min_s)],
                          capture_output=True, text=True, timeout=1800)
    log.write(f"--- independent {case.label}\n{proc.stderr}\n")
    try:
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["p50"])
    except (ValueError, IndexError, KeyError):
        return None


def _p50(case: Case) -> float | None:
    vals = [r["latency_ms"]["p50"] for r in case.rounds if r.get("latency_ms")]
    return statistics.median(vals) if vals else None


def _kernels(case: Case) -> str:
    last = next((r for r in reversed(case.rounds) if r.get("status") != "failed"), None)
    if last is None:
        return "—"
    k = last.get("kernels")
    if not k:
        return "not reported"
    floats = k.get("float") or []
    text = f"{len(k.get('integer') or [])} int, {len(floats)} float"
    return text + (f" ({', '.join(floats[:4])}{' …' if len(floats) > 4 else ''})"
                   if floats and case.variant != "fp32" else "")


def report(cases: list[Case], args) -> str:
    flags = cpu_flags()
    rows = ["| case | status | median ms | round spread | speed-up vs FP32 | kernels | "
            "independent timer |", "|---|---|---|---|---|---|---|"]
    fp32 = {(c.group, c.runtime): _p50(c) for c in cases if c.variant == "fp32"}
    for c in cases:
        p50 = _p50(c)
        vals = [r["latency_ms"]["p50"] for r in c.rounds if r.get("latency_ms")]
        spread = f"{(max(vals) - min(vals)) / p50:.1%}" if p50 and len(vals) > 1 else "—"
        base = fp32.get((c.group, c.runtime))
        speed = f"{base / p50:.2f}×" if base and p50 and c.variant != "fp32" else "—"
        statuses = sorted({r.get("status", "?") for r in c.rounds})
        busy = sum(bool(r.get("load", {}).get("busy")) for r in c.rounds)
        status = "/".join(statuses) + (f" ({busy} busy)" if busy else "")
        ind = statistics.median(c.indep) if c.indep else None
        indep = f"{ind:.3f} ms ({p50 / ind - 1:+.1%})" if ind and p50 else "—"
        ms = f"{p50:.3f}" if p50 else "—"
        rows.append(f"| {c.label} | {status} | {ms} | {spread} | {speed} | {_kernels(c)} "
                    f"| {indep} |")
    by = {c.label: c for c in cases}
    m = args.model
    lines = ["", f"CPU flags: {', '.join(f for f, on in flags.items() if on) or 'none'} "
             f"(absent: {', '.join(f for f, on in flags.items() if not on) or 'none'}); "
             f"batch 1, {args.threads} threads, {args.rounds} rounds, each ≥{args.min_iters} "
             f"runs and ≥{args.min_s} s after {args.warmup} warm-up runs, one process per "
             "case per round.", "", "Targets:"]
    hilq, peer = _p50(by[f"{m} hilq W8A8 · ort"]), _p50(by[f"{m} peer W8A8 (ORT quantize_static) · ort"])
    if hilq and peer:
        lines.append(f"- hilq W8A8 on ORT / peer: {hilq / peer:.3f} (target ≤ 1.05) "
                     f"{'PASS' if hilq / peer <= 1.05 else 'FAIL'}")
    best = [(fp32.get((c.group, c.runtime)) / _p50(c), c.label) for c in cases
            if c.group == m and c.variant == "w8a8" and "peer" not in c.label and _p50(c)
            and fp32.get((c.group, c.runtime))]
    if best:
        ratio, label = max(best)
        lines.append(f"- best INT8 speed-up over its FP32: {ratio:.2f}× ({label}) (target ≥ 1.8× "
                     f"on AVX2) {'PASS' if ratio >= 1.8 else 'FAIL'}")
    for c in cases:
        if c.group == m and c.variant == "w8a8" and c.rounds:
            k = c.rounds[-1].get("kernels") or {}
            ok = bool(k.get("integer")) and not k.get("float")
            lines.append(f"- kernels all integer, {c.label}: "
                         f"{'PASS' if ok else ('not reported' if not k else 'FAIL')}")
    for c in cases:
        if c.indep and _p50(c):
            d = _p50(c) / statistics.median(c.indep) - 1
            lines.append(f"- harness vs independent timer, {c.label}: {d:+.1%} (target within "
                         f"±5%) {'PASS' if abs(d) <= 0.05 else 'FAIL'}")
    t = args.transformer
    for rt in ("ort", "openvino"):
        t32, t4 = by.get(f"{t} FP32 · {rt}"), by.get(f"{t} hilq W4A16 · {rt}")
        if t32 and t4 and _p50(t32) and _p50(t4):
            lines.append(f"- {t} W4A16 (weight-only INT4) vs FP32 on {rt}: "
                         f"{_p50(t32) / _p50(t4):.2f}× speed-up")
    return "\n".join(rows + lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--transformer", default="tiny-transformer",
                   help="model for the INT4 weight-only vs FP32 ratio on ORT ('none' to skip)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch cases")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-iters", type=int, default=40)
    p.add_argument("--min-s", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / ".cache" / "bench-runtimes"))
    p.add_argument("--json", help="write every round's raw results here")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args, out)
    protocol = {"warmup_iters": args.warmup, "warmup_s": 1.0, "min_iters": args.min_iters,
                "min_duration_s": args.min_s, "batch": 1, "threads": args.threads,
                "mode": "latency", "seed": 0, "runtime_options": {"mode": "compile"}}
    with open(out / "bench.log", "w") as log:
        for r in range(args.rounds):
            k = r % len(cases)
            for c in cases[k:] + cases[:k]:
                print(f"round {r + 1}/{args.rounds}: {c.label}", file=sys.stderr)
                c.rounds.append(run_agent(c, protocol, log))
                if c.independent:
                    v = run_independent(c, args, log)
                    if v is not None:
                        c.indep.append(v)
    print(report(cases, args))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu_flags": cpu_flags(), "protocol": protocol, "cases": [
                {"label": c.label, "runtime": c.runtime, "path": c.path, "variant": c.variant,
                 "rounds": c.rounds, "independent_p50_ms": c.indep} for c in cases]},
            indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
