"""Bring your own model and data: an ONNX file and a PyTorch factory, a folder of images
written by Pillow and .npz arrays, through quantize → export → bench → report, and every bad
input as one line (exit 2)."""

import hashlib
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PRE = "resize=32,crop=32,mean=0.5/0.5/0.5,std=0.25/0.25/0.25"
if importlib.util.find_spec("onnx2torch") is None and not os.environ.get("CI"):
    pytest.skip("onnx2torch is not installed (tox installs it with --no-deps; see tox.ini)",
                allow_module_level=True)


def hilq(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hilq", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.user_models import tiny_cnn

    path = tmp_path_factory.mktemp("m") / "tiny.onnx"
    torch.onnx.export(tiny_cnn(), torch.zeros(1, 3, 32, 32), path, input_names=["image"],
                      output_names=["logits"], dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 40×36 RGB photos-to-be (seeded noise with a class-dependent tint)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i in range(8):
            a = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            a[..., k] //= 2
            Image.fromarray(a).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_image_folder_and_preprocessing(images):
    from hilq.quant.data import load_data, parse_preprocess

    d = load_data(str(images), parse_preprocess(PRE))
    assert tuple(d.calib_x.shape) == (8, 3, 32, 32) and tuple(d.test_x.shape) == (8, 3, 32, 32)
    assert d.test_y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]      # sub-folder per class, sorted
    # the same decode by hand through Pillow: shorter side to 32, centre crop, scale, normalise
    from PIL import Image

    im = Image.open(images / "cat" / "0.jpg").convert("RGB")
    im = im.resize((36, 32), Image.Resampling.BILINEAR).crop((2, 0, 34, 32))
    want = (np.asarray(im, np.float32) / 255 - 0.5) / 0.25
    assert np.allclose(d.calib_x[0].numpy(), want.transpose(2, 0, 1), atol=1e-6)
    nhwc = load_data(str(images), parse_preprocess(PRE + ",layout=NHWC"))
    assert tuple(nhwc.calib_x.shape[1:]) == (32, 32, 3)


def test_arrays_npz_and_npy(tmp_path):
    from hilq.quant.data import load_data

    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    d = load_data(str(tmp_path / "d.npz"))
    assert len(d.calib_x) == 5 and d.test_y.tolist() == [1, 0, 2, 1, 0]
    np.save(tmp_path / "d.npy", x)
    assert load_data(str(tmp_path / "d.npy")).test_y is None


@pytest.mark.slow
def test_onnx_file_through_every_command(onnx_model, images, tmp_path):
    db = tmp_path / "r.sqlite"
    q = tmp_path / "q.json"
    r = hilq("quantize", "--model", onnx_model, "--data", images, "--preprocess", PRE,
             "--w-bits", 8, "--a-bits", 8, "--json", q)
    assert r.returncode == 0, r.stderr
    res = json.loads(q.read_text())
    assert len(res["bit_config"]) == 3 and res["fp32_top1"] is not None

    # fp32 is the user's file, byte for byte
    out = tmp_path / "art"
    r = hilq("export", "--model", onnx_model, "--variant", "fp32", "--out", out, "--json",
             tmp_path / "fp32.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "fp32.json").read_text())
    assert m["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert m["input_name"] == "image" and m["input_shape"] == [1, 3, 32, 32]

    r = hilq("export", "--model", onnx_model, "--data", images, "--preprocess", PRE,
             "--variant", "w8a8", "--out", out, "--json", tmp_path / "w8.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "w8.json").read_text())
    assert m["settings"]["preprocess"]["crop"] == 32            # recorded for the device
    ops = {n.op_type for n in onnx.load(m["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    r = hilq("bench", "--model", onnx_model, "--data", images, "--preprocess", PRE,
             "--variants", "fp32,w8a8", "--rounds", 1, "--min-duration-s", 0.2, "--min-iters",
             20, "--db", db)
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(db) as c:
        rows = c.execute("select variant, status from measurements").fetchall()
    assert sorted(rows) == [("fp32", "ok"), ("w8a8", "ok")]

    rep = tmp_path / "rep"
    r = hilq("report", "--db", db, "--out", rep)
    assert r.returncode == 0, r.stderr
    assert str(onnx_model) in next(rep.rglob("report.md")).read_text()


@pytest.mark.slow
def test_factory_without_data_is_data_free(tmp_path):
    out = tmp_path / "art"
    r = hilq("export", "--model", "tests.user_models:tiny_cnn", "--input-shape", "1,3,32,32",
             "--variant", "w8a8", "--calib-data", "distilled", "--out", out, "--json",
             tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["settings"]["calib_data"] == "distilled" and m["format"] == "onnx-qdq"
    # without --calib-data it needs data, and says how to do without
    one_line_error(hilq("export", "--model", "tests.user_models:tiny_cnn", "--input-shape",
                        "1,3,32,32", "--variant", "w8a8", "--out", out),
                   "no calibration data", "--calib-data distilled")


def _input_range(artifact: Path) -> float:
    """The width (scale × 255) of the Q node on the graph's input: the calibrated input range."""
    from onnx import numpy_helper

    g = onnx.load(artifact).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == g.input[0].name)
    return float(init[q.input[1]]) * 255


@pytest.mark.slow
def test_data_free_calibration_stays_within_what_the_preprocessing_makes(tmp_path):
    """Declared preprocessing (mean 0.5, std 0.25) bounds inputs to [-2, 2]: the distilled
    calibration batch, hence the input's quantization range, stays inside it, and the
    preprocessing is in the manifest. ZeroQ's N(0, 1) start, unbounded, goes wider."""
    widths = {}
    for name, extra in (("declared", ("--preprocess", PRE)), ("zeroq", ())):
        out = tmp_path / name
        r = hilq("export", "--model", "tests.user_models:tiny_cnn", "--input-shape", "1,3,32,32",
                 "--variant", "w8a8", "--calib-data", "distilled", *extra, "--out", out,
                 "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        m = json.loads((tmp_path / f"{name}.json").read_text())
        widths[name] = _input_range(Path(m["path"]))
    assert widths["declared"] <= 4.0 + 1e-3 < widths["zeroq"], widths
    assert m["settings"]["calib_data"] == "distilled"


def test_bad_inputs_one_line_each(onnx_model, images, tmp_path):
    said = []
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    said.append(one_line_error(hilq("export", "--model", bad, "--variant", "fp32", "--out", tmp_path),
                   "cannot load ONNX file", "bad.onnx"))
    said.append(one_line_error(hilq("export", "--model", tmp_path / "missing.onnx", "--variant", "fp32",
                        "--out", tmp_path), "no such ONNX file"))
    said.append(one_line_error(hilq("export", "--model", onnx_model, "--input-shape", "1,3,64,64",
                        "--variant", "fp32", "--out", tmp_path), "does not match"))
    # images of the wrong size for the model
    said.append(one_line_error(hilq("quantize", "--model", onnx_model, "--data", images, "--preprocess",
                        "resize=40,crop=40", "--w-bits", 8, "--a-bits", 8),
                   "shape (3, 40, 40)", "(3, 32, 32)"))
    empty = tmp_path / "empty"
    empty.mkdir()
    said.append(one_line_error(hilq("quantize", "--model", onnx_model, "--data", empty, "--w-bits", 8,
                        "--a-bits", 8), "no images"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"{i}.png").write_bytes(b"\x89PNG not really")
    said.append(one_line_error(hilq("quantize", "--model", onnx_model, "--data", broken, "--w-bits", 8,
                        "--a-bits", 8), "cannot decode image", "0.png"))
    x = np.zeros((6, 3, 32, 32), np.float32)
    np.savez(tmp_path / "lab.npz", x=x, y=np.array([0, 1, 2, 3, 4, 99]))
    said.append(one_line_error(hilq("quantize", "--model", onnx_model, "--data", tmp_path / "lab.npz",
                        "--w-bits", 8, "--a-bits", 8), "labels", "outside", "3 outputs"))
    said.append(one_line_error(hilq("export", "--model", "tests.user_models:not_a_module", "--input-shape",
                        "1,3,32,32", "--variant", "fp32", "--out", tmp_path),
                   "returned dict", "nn.Module"))
    said.append(one_line_error(hilq("bench", "--model", "tests.user_models:tiny_cnn", "--variants", "fp32",
                        "--no-store"), "needs --data", "--input-shape"))
    said.append(one_line_error(hilq("export", "--model", onnx_model, "--variant", "w8a8", "--calib-data",
                        "distilled", "--out", tmp_path), "no BatchNorm"))
    said.append(one_line_error(hilq("export", "--model", onnx_model, "--preprocess", "size=3",
                        "--data", images, "--variant", "fp32", "--out", tmp_path),
                   "unknown preprocessing key 'size'"))
    said.append(one_line_error(hilq("export", "--model", onnx_model, "--variant", "fp32", "--out",
                        "/proc/version/out"), "--out"))
    said.append(one_line_error(hilq("quantize", "--model", _batch_one_onnx(tmp_path), "--data",
                                    images, "--preprocess", PRE, "--w-bits", 8, "--a-bits", 8),
                               "runs only at batch 1", "dynamic batch"))
    # every bad input got its own message (none generic, none a traceback)
    assert len(said) == 13 and len(set(said)) == len(said), said
    assert not any("Traceback" in line or "Error:" in line.split(":", 1)[0] for line in said)


def _batch_one_onnx(tmp_path) -> Path:
    """A CNN whose export baked its example batch of 1 into a Reshape (`x.view(n, -1)`
    traced without a dynamic batch axis): what many exported files in the wild look like."""
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 32 * 32, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.shape[0], -1))

    path = tmp_path / "batch1.onnx"
    torch.onnx.export(Flat().eval(), torch.zeros(1, 3, 32, 32), path, input_names=["image"],
                      output_names=["logits"], dynamo=False, opset_version=17)
    return path


def test_dynamic_onnx_needs_input_shape(onnx_model, tmp_path):
    m = onnx.load(onnx_model)
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"
    dyn = tmp_path / "dyn.onnx"
    onnx.save(m, dyn)
    one_line_error(hilq("export", "--model", dyn, "--variant", "fp32", "--out", tmp_path),
                   "input image has dynamic dimensions [1,3,?,?]", "--input-shape image=")
    r = hilq("export", "--model", dyn, "--input-shape", "1,3,32,32", "--variant", "fp32",
             "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr


def test_artifact_cache_follows_file_contents(images, tmp_path):
    """Same paths, same weights, other content: the ONNX file re-exported with another
    activation (EfficientNet-Lite's set_swish swapped ReLU6 for Swish), then one photo of the
    calibration folder replaced; each must build a new artifact, not reuse the stale one."""
    import shutil

    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from hilq.quant.export import build_artifact
    from hilq.quant.models import ModelRef

    from tests.user_models import tiny_cnn

    net, model, data = tiny_cnn(), tmp_path / "m.onnx", tmp_path / "photos"
    shutil.copytree(images, data)

    def export(act):
        net[2] = act
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), model, input_names=["image"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})

    def build():
        ref = ModelRef(str(model), data=str(data), preprocess=PRE)
        return Path(build_artifact(ref, "w8a8", tmp_path / "art").path)

    export(nn.ReLU())
    first = build()
    assert build() == first                       # unchanged: the cache is used
    export(nn.Sigmoid())
    second = build()
    assert second != first
    assert "Sigmoid" in {n.op_type for n in onnx.load(second).graph.node}
    a = np.asarray(Image.open(data / "cat" / "0.jpg"))
    Image.fromarray(255 - a).save(data / "cat" / "0.jpg")
    assert build() not in (first, second)


def test_onnx_with_a_reshape_reaches_the_layer_passes(tmp_path):
    """An exported classifier flattens with a Reshape; onnx2torch's Reshape branches on its
    shape tensor, which torch.fx cannot trace. The layer passes (BatchNorm folding, the
    search's precision boundaries) must still see every conv and linear (`hilq search` on
    EfficientNet-Lite's ONNX file died with a TraceError)."""
    from hilq.bench.search import float_edges
    from hilq.quant.models import ModelRef, load_model
    from hilq.quant.transform import fold_bn, quantizable_layers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(y.reshape(y.shape[0], -1))

    path = tmp_path / "reshape.onnx"
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, 8, 8), path, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False, opset_version=17)
    assert "Reshape" in {n.op_type for n in onnx.load(path).graph.node}
    net = fold_bn(load_model(ModelRef(str(path), input_shape=(1, 3, 8, 8))).build().eval())
    layers = quantizable_layers(net)
    assert len(layers) == 2
    assert float_edges(net, layers) == [(layers[0], layers[1])]
