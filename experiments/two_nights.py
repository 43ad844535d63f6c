"""A real regression, injected and caught: nights of `hilq nightly` on one ONNX file, then the
same file with an extra convolution that costs about 10%, flagged on that night with the
series' minimum detectable effect in the report (issue: noise).

    python -m experiments.two_nights [--nights 3] [--out .cache/two-nights]

The model is ResNet-18 FP32 exported by hilq, benchmarked through the ONNX model door (the
series is keyed by the file's path, so both versions are one series). The slowdown: a 7×7
convolution of the input, reduced to a scalar, multiplied by zero and added to the logits
(the answer is unchanged, the work is real). The nightlies use `detect = 0.05`: rounds are
added until each series can see 5%. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from hilq.bench import config
from hilq.bench.nightly import run_nightly
from hilq.bench.runner import artifact_for, measure_artifacts
from hilq.bench.store import open_store
from hilq.devices.local import LocalDevice

from experiments.closed_loop_real import cpu
from hilq.measurement import Protocol

ROOT = Path(__file__).resolve().parents[1]


def slowed(src: Path, dst: Path, channels: int) -> None:
    """`src` with logits += 0 * mean(conv7x7(input)) (a conv of `channels` outputs)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    x, y = g.input[0].name, g.output[0].name
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((channels, 3, 7, 7)).astype(np.float32), "inj_w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "inj_zero")
    g.initializer.extend([w, zero])
    old = y + "_before_injection"
    for node in g.node:
        node.output[:] = [old if o == y else o for o in node.output]
    g.node.extend([
        helper.make_node("Conv", [x, "inj_w"], ["inj_c"], kernel_shape=[7, 7], pads=[3] * 4,
                         strides=[2, 2]),
        helper.make_node("ReduceMean", ["inj_c"], ["inj_m"], keepdims=0),
        helper.make_node("Mul", ["inj_m", "inj_zero"], ["inj_0"]),
        helper.make_node("Add", [old, "inj_0"], [y])])
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


CONFIG = """
name = "two-nights"
rounds = 3
regression_threshold = 0.03   # below the 5% the nightly must see (detect must exceed it)
detect = 0.05
max_rounds = 12
detect_budget_s = {budget}
db = "{db}"
[protocol]
warmup_iters = 10
warmup_s = 1.0
min_iters = 50
min_duration_s = 2.0
[[bench]]
model = "{model}"
variants = ["fp32"]
accuracy = false
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nights", type=int, default=3, help="nights before the slowdown")
    ap.add_argument("--channels", type=int, default=96)
    ap.add_argument("--detect-budget-s", type=int, default=90,
                    help="a night's time for adding rounds to reach detect = 0.05")
    ap.add_argument("--rounds", type=int, default=8, help="side-by-side rounds for the cost")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "two-nights")
    args = ap.parse_args()
    print(f"CPU: {cpu()}")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base = Path(artifact_for("resnet18", "fp32", args.out / "build", "ort").path)
    model = args.out / "resnet18.onnx"
    shutil.copy(base, model)
    (args.out / "n.toml").write_text(CONFIG.format(db=args.out / "hilq.sqlite", model=model,
                                                     budget=args.detect_budget_s))
    for night in range(args.nights + 1):
        if night == args.nights:
            slowed(base, model, args.channels)
            print(f"night {night + 1}: the model now has the injected convolution")
        cfg = config.load(args.out / "n.toml")
        t0 = time.perf_counter()
        res = run_nightly(cfg, say=lambda s: None, report=night == args.nights)
        p50 = [m["p50_ms"] for m in res.measurements]
        print(f"night {night + 1}: {res.status} in {time.perf_counter() - t0:.0f} s, "
              f"p50 {p50}, regressions {len(res.regressions)}")
        for what, why in res.failures:
            print(f"  failed: {what}: {why}")
    store = open_store(args.out / "hilq.sqlite")
    last = store.resolve_run("latest")
    for v in store.regressions(last):
        print(f"verdict {v['variant']} {v['metric']}: change {_pct(v['change'])}, flagged "
              f"{v['flagged']}, can see ≥ {_pct(v['mde'])} (n history {v['n_history']}), "
              f"{v['method']}; {v['note']}")
    print(f"report: {res.report}")
    cost(base, model, args.out, args.rounds)
    return 0


def cost(base: Path, slow: Path, out: Path, rounds: int) -> None:
    """What the injection costs, measured side by side: both files alternating in fresh agent
    processes (A B A B ...), the median of each one's round p50s and their ratio."""
    import statistics

    arts = {}
    for name, src in (("before", base), ("after", slow)):
        shutil.copy(src, out / f"{name}.onnx")      # through the ONNX door, as the nightly
        arts[name] = artifact_for(str(out / f"{name}.onnx"), "fp32", out / "cost", "ort")
    per = measure_artifacts(LocalDevice(workdir=str(out / "device")), "ort", "resnet18", arts,
                            Protocol(warmup_iters=10, warmup_s=1.0, min_iters=50,
                                     min_duration_s=2.0), rounds=rounds)
    med = {k: statistics.median(m.latency_ms["p50"] for m in v if m.ok) for k, v in per.items()}
    print(f"side by side, {rounds} alternating rounds: before {med['before']:.2f} ms, after "
          f"{med['after']:.2f} ms, the injection costs {_pct(med['after'] / med['before'] - 1)}")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


if __name__ == "__main__":
    sys.exit(main())
