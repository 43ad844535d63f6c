"""What makes ZeroQ's distilled data calibrate well: input prior, objective, iterations and
observer, judged on real photographs (issue 13).

    python -m experiments.byo_model prepare            # the model and photos (once)
    python -m experiments.distill_study [--iters 25,50,100,200] [--samples 32] [--json out.json]

For EfficientNet-Lite0 (pretrained, experiments/byo_model.py) this distils one batch per
(input prior × objective), keeping snapshots at each iteration count, and calibrates W8A8
(per-channel weights, per-tensor activations) on every snapshot with each of hilq's
observers; every row is judged in hilq's fake-quant simulation on the evaluation photos by
top-1 agreement with FP32 and mean KL(FP32 ‖ W8A8), beside the same observers calibrated on
the real calibration photos and on Gaussian noise. Distilled batches are kept under
`.cache/byo/distilled/` so a rerun only re-judges. CPU-bound for tens of minutes: run it
alone. The `input prior` is either ZeroQ's (inputs N(0, 1), unbounded) or the one the
declared preprocessing implies (`quant.zeroq.input_prior`: mean, std and range of photographs
through EfficientNet-Lite's own normalisation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


OBSERVERS = ("minmax", "percentile", "mse", "entropy")


def _judge(ref, got) -> dict:
    import torch

    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "mean_kl": float(kl.mean())}


def _w8a8(fmodel, calib_x, observer, names, repairs=()):
    from hilq.quant.spec import parse_variant, variant_config
    from hilq.quant.transform import batches, calibrate, prepare

    config = variant_config(parse_variant("w8a8"), names, calib=observer)
    q = calibrate(prepare(fmodel, config, fold=False), batches(calib_x, 16)).eval()
    if "bias" in repairs:
        from hilq.quant.repairs import bias_correction
        bias_correction(q, fmodel, calib_x)
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "byo")
    ap.add_argument("--iters", default="25,50,100,200")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--objectives", default="batch,sample")
    ap.add_argument("--priors", default="zeroq,preprocess")
    ap.add_argument("--bias", action="store_true", help="also rows with bias correction")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from byo_model import PRE, efficientnet_lite0
    from hilq.quant import zeroq
    from hilq.quant.data import load_data, parse_preprocess
    from hilq.quant.evaluate import logits
    from hilq.quant.transform import fold_bn, quantizable_layers

    torch.manual_seed(0)
    pre = parse_preprocess(PRE)
    data = load_data(str(args.out / "photos"), pre)
    model = efficientnet_lite0()
    fmodel = fold_bn(model)
    names = list(quantizable_layers(fmodel))
    ref = logits(model, data.test_x)
    iters = sorted(int(i) for i in args.iters.split(","))
    keep = args.out / "distilled"
    keep.mkdir(parents=True, exist_ok=True)
    rows = []

    def judge(source, calib_x, **info):
        for obs in OBSERVERS:
            for rep in ((), ("bias",)) if args.bias else ((),):
                t0 = time.perf_counter()
                q = _w8a8(fmodel, calib_x, obs, names, rep)
                row = {"source": source, "observer": obs, "repairs": "+".join(rep) or "-",
                       **info, **_judge(ref, logits(q, data.test_x)),
                       "calib_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    judge("real", data.calib_x, samples=len(data.calib_x))
    judge("noise N(0,1)", zeroq.noise(args.samples, data.calib_x.shape[1:]),
          samples=args.samples)
    for prior_name in args.priors.split(","):
        prior = zeroq.input_prior(pre) if prior_name == "preprocess" else {}
        for objective in args.objectives.split(","):
            tag = f"{prior_name}-{objective}-n{args.samples}"
            files = {i: keep / f"{tag}-i{i}.pt" for i in iters}
            if not all(f.exists() for f in files.values()):
                t0 = time.perf_counter()

                def snap(i, x, files=files, tag=tag, t0=t0):
                    if i in files:
                        torch.save(x, files[i])
                        print(f"  {tag}: {i} iterations in {time.perf_counter() - t0:.0f} s",
                              file=sys.stderr, flush=True)
                zeroq.distill(model, args.samples, data.calib_x.shape[1:], iters=max(iters),
                              objective=objective, snapshot=snap, **prior)
            for i in iters:
                x = torch.load(files[i])
                judge(f"distilled {prior_name}/{objective}", x, iters=i, samples=args.samples,
                      x_min=round(float(x.min()), 2), x_max=round(float(x.max()), 2),
                      x_std=round(float(x.std()), 3))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| calibration data | iters | observer | repairs | agreement | mean KL |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r.get('iters', '')} | {r['observer']} | {r['repairs']} | "
              f"{100 * r['agreement']:.1f}% | {r['mean_kl']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
