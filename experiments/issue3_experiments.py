"""Issue 3's must-show numbers on `digits-cnn`, printed as Markdown tables.

    python -m experiments.issue3_experiments [--seeds 3] [--iters 500] [--samples 32]

1. ZeroQ ablation: W8A8 / W4A8 / W4A4 accuracy with activation ranges calibrated on real
   data, ZeroQ-distilled data and Gaussian noise.
2. Mixed beats uniform: at the size of uniform W4A8 and W3A8, the ILP allocation from KL and
   from Hessian sensitivity (all data-free: distilled batch for sensitivity and calibration)
   against the uniform config.
3. QAT: the share of the W4A4 (and W3A3) accuracy gap that 3 epochs of QAT recover, with and
   without distillation from the FP32 model, with learned and with frozen activation scales.

Several minutes on a shared 2-core machine; one intra-op thread (small model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from hilq.quant import qat, zeroq
from hilq.quant.allocate import CostTable, solve_ilp
from hilq.quant.evaluate import top1
from hilq.quant.models import load_model
from hilq.quant.sensitivity import config_from_allocation, sensitivity_table
from hilq.quant.spec import parse_variant, variant_config
from hilq.quant.transform import (
    fold_bn,
    layer_infos,
    quantizable_layers,
    quantize,
    size_bits,
)


def acc(model, cfg, calib, data) -> float:
    return 100 * top1(quantize(model, cfg, calib), data.test_x, data.test_y)


def uniform(model, name: str):
    return variant_config(parse_variant(name), quantizable_layers(model))


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def ablation(model, data, args) -> dict:
    t0 = time.perf_counter()
    distilled = [zeroq.distill(model, args.samples, data.calib_x.shape[1:], iters=args.iters,
                               seed=s) for s in range(args.seeds)]
    per_seed = (time.perf_counter() - t0) / args.seeds
    kinds = {
        f"real ({len(data.calib_x)})": [data.calib_x],
        f"real ({args.samples})": [data.calib_x[: args.samples]],
        "distilled (ZeroQ)": distilled,
        "noise N(0,1)": [zeroq.noise(args.samples, data.calib_x.shape[1:], s)
                         for s in range(args.seeds)],
    }
    print("\n### ZeroQ ablation: calibration data vs top-1 (%) on digits-cnn\n")
    print(f"FP32: {100 * top1(model, data.test_x, data.test_y):.2f}. Distilled/noise: "
          f"{args.samples} samples, mean (min–max) over seeds 0..{args.seeds - 1}; "
          f"distillation {args.iters} iterations, Adam lr 0.5, plateau decay, input term "
          f"N(0,1) ({per_seed:.1f} s per batch, 1 thread).\n")
    print("| variant | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for v in ("w8a8", "w4a8", "w4a4"):
        cells = [spread([acc(model, uniform(model, v), x, data) for x in xs])
                 for xs in kinds.values()]
        print(f"| {v.upper()} | " + " | ".join(cells) + " |")
    return kinds


def mixed_vs_uniform(model, data, x, args) -> None:
    bits = (2, 3, 4, 5, 6, 8)
    infos = layer_infos(fold_bn(model), data.calib_x.shape[1:])
    print("\n### Mixed vs uniform precision at equal weight size (A8 everywhere, data-free)\n")
    print(f"Sensitivity and calibration on one distilled batch ({args.samples} samples, seed 0); "
          f"options w{{{','.join(map(str, bits))}}}a8; ILP (HiGHS) with size_bits ≤ budget.\n")
    print("| budget | config | method | size (kbit) | top-1 (%) | allocation |")
    print("|---|---|---|---|---|---|")
    tables = {}
    for method in ("kl", "hessian"):
        t0 = time.perf_counter()
        tables[method] = sensitivity_table(model, x, bits, method=method, act_bits=8)
        print(f"<!-- {method} sensitivity {time.perf_counter() - t0:.1f} s -->", file=sys.stderr)
    for w in (4, 3):
        base = uniform(model, f"w{w}a8")
        budget = size_bits(infos, base)
        print(f"| W{w} size | uniform w{w}a8 | – | {budget / 1e3:.1f} | "
              f"{acc(model, base, x, data):.2f} | all w{w}a8 |")
        for method, df in tables.items():
            alloc = solve_ilp(CostTable.from_frame(df), {"size_bits": budget})
            cfg = config_from_allocation(model, alloc)
            short = ", ".join(f"{k}:{p[:2]}" for k, p in alloc.config.items())
            print(f"| W{w} size | mixed | {method} | {alloc.totals['size_bits'] / 1e3:.1f} | "
                  f"{acc(model, cfg, x, data):.2f} | {short} |")


def qat_recovery(model, data, args) -> None:
    print("\n### QAT: share of the PTQ accuracy gap recovered (3 epochs, Adam lr 1e-4, "
          "activation-scale lr 1e-2, T=4, α=0.5)\n")
    print("PTQ = min-max calibration on the real calibration set. Recovered = "
          "(QAT − PTQ)/(FP32 − PTQ); mean (min–max) over shuffling seeds "
          f"0..{args.qat_seeds - 1}.\n")
    print("| variant | act. scales | FP32 | PTQ | QAT + KD | recovered | QAT, CE only | recovered |")
    print("|---|---|---|---|---|---|---|---|")
    fp = 100 * top1(model, data.test_x, data.test_y)
    for v in ("w4a4", "w3a3"):
        q = quantize(model, uniform(model, v), data.calib_x)
        ptq = 100 * top1(q, data.test_x, data.test_y)
        for learn in (True, False):
            row = ["learned" if learn else "frozen", f"{fp:.2f}", f"{ptq:.2f}"]
            for distill in (True, False):
                accs = [100 * top1(qat.finetune(q, model, data.train_x, data.train_y, epochs=3,
                                                distill=distill, learn_scales=learn, seed=s),
                                   data.test_x, data.test_y) for s in range(args.qat_seeds)]
                rec = [100 * (a - ptq) / (fp - ptq) for a in accs] if fp > ptq else [float("nan")]
                row += [spread(accs), spread(rec) + " %"]
            print(f"| {v.upper()} | " + " | ".join(row) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="distillation/noise seeds")
    p.add_argument("--qat-seeds", type=int, default=5)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    entry = load_model("digits-cnn")
    model, data = entry.build().eval(), entry.data()
    kinds = ablation(model, data, args)
    mixed_vs_uniform(model, data, kinds["distilled (ZeroQ)"][0], args)
    qat_recovery(model, data, args)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
