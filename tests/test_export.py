"""ONNX Q/DQ export: runs in ONNX Runtime, agrees with the fake-quant model, fuses into
integer kernels (read back from ORT's optimized graph), keeps float layers float, writes
MatMulNBits for weight-only Linear layers, and produces a checked artifact."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import export_digits_w8a8, ort_quantize_static
from hilq.devices.runtimes import ort as ort_runtime
from hilq.quant.artifact import Artifact
from hilq.quant.export import build_artifact, export_onnx, float_model, target_config
from hilq.quant.spec import BitConfig, parse_variant, variant_config
from hilq.quant.transform import fold_bn, quantizable_layers, quantize
from onnx import numpy_helper
from torch import nn


class ResCNN(nn.Module):
    """Conv-BN-ReLU, a residual block (add), max-pool, GAP, Linear: every unit ORT fuses."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)
        x = torch.relu(self.c3(self.pool(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def _res_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResCNN()
    with torch.no_grad():     # non-trivial BN statistics, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return model.eval(), x


def _w8a8(model, x, target="cpu"):
    cfg = variant_config(parse_variant("w8a8"), quantizable_layers(fold_bn(model)))
    return quantize(model, target_config(cfg, target), x[:64])


def _session(path, precise=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # exact u8s8 kernels: the default AVX2 path saturates int16 pair sums (see test_intref)
    so.add_session_config_entry("session.x64quantprecision", "1" if precise else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _kernels(path) -> dict:
    loaded = ort_runtime.load(str(path), {"threads": 1})
    try:
        return loaded.kernels()
    finally:
        loaded.close()


def _ops(kernels: dict) -> dict[str, str]:
    return {d["name"]: d["op"] for d in kernels["detail"]}


def _assert_all_integer(path, n_conv: int):
    k = _kernels(path)
    assert not k["float"], f"layers ran in float kernels: {k['float']}"
    ops = list(_ops(k).values())
    assert ops.count("QLinearConv") == n_conv, f"expected {n_conv} QLinearConv, got {ops}"


# ---------------------------------------------------------------- small residual CNN

def test_w8a8_res_cnn_runs_in_ort_and_fuses_fully(tmp_path):
    model, x = _res_cnn()
    qm = _w8a8(model, x)
    info = export_onnx(qm, (3, 12, 12), tmp_path / "m.onnx", calib_x=x[:64])
    assert {v["layer"] for v in info["layer_map"].values()} == {"stem.0", "c1", "c2", "c3", "fc"}
    assert all(v["precision"] == "w8a8" for v in info["layer_map"].values())
    _assert_all_integer(tmp_path / "m.onnx", n_conv=4)
    ops = set(_ops(_kernels(tmp_path / "m.onnx")).values())
    assert {"QLinearAdd", "QGemm", "QLinearGlobalAveragePool"} <= ops
    y = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        f = qm(x).numpy()
    # extra quantization points (conv outputs before the add, the logits) cost a few LSB
    assert np.abs(y - f).max() < 0.05 * np.abs(f).max()
    assert (y.argmax(1) == f.argmax(1)).mean() >= 0.95


def test_dynamic_batch_and_weights_stored_int8(tmp_path):
    model, x = _res_cnn()
    export_onnx(_w8a8(model, x), (3, 12, 12), tmp_path / "m.onnx", calib_x=x[:64])
    m = onnx.load(tmp_path / "m.onnx")
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq_w = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    kinds = {inits[n.input[0]].dtype for n in dq_w}
    assert kinds == {np.dtype(np.int8), np.dtype(np.int32)}     # weights, biases
    assert not any(v.dtype == np.float32 and v.ndim == 4 for v in inits.values()), \
        "a conv weight is still stored in float"
    sess = _session(tmp_path / "m.onnx")
    for b in (1, 5):
        assert sess.run(None, {"input": x[:b].numpy()})[0].shape == (b, 10)


def test_float_layer_stays_float(tmp_path):
    model, x = _res_cnn()
    names = quantizable_layers(fold_bn(model))
    cfg = variant_config(parse_variant("w8a8"), names)
    cfg = BitConfig({n: p for n, p in cfg.layers.items() if n != "c3"})
    qm = quantize(model, cfg, x[:64])
    info = export_onnx(qm, (3, 12, 12), tmp_path / "m.onnx", calib_x=x[:64])
    node = next(n for n, v in info["layer_map"].items() if v["layer"] == "c3")
    assert info["layer_map"][node]["precision"] == "fp32"
    m = onnx.load(tmp_path / "m.onnx")
    conv = next(n for n in m.graph.node if n.name == node)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert inits[conv.input[1]].dtype == np.float32     # the float weight, no DequantizeLinear
    k = _kernels(tmp_path / "m.onnx")
    assert len(k["float"]) == 1, k["float"]     # ORT names it after its output (NCHWc Conv)
    assert list(_ops(k).values()).count("QLinearConv") == 3
    y = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        f = qm(x).numpy()
    assert np.abs(y - f).max() < 0.05 * np.abs(f).max()


def test_tensorrt_int8_symmetric_loads_in_ort(tmp_path):
    model, x = _res_cnn()
    qm = _w8a8(model, x, target="tensorrt")
    info = export_onnx(qm, (3, 12, 12), tmp_path / "m.onnx", act_dtype="int8", calib_x=x[:64])
    assert info["placement"] == "tensorrt" and not info["calibrated_tensors"]
    m = onnx.load(tmp_path / "m.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: not INT8 symmetric"
            if n.input[0] in inits:
                assert inits[n.input[0]].min() >= -127, "weights must be narrow-range"
    y = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        f = qm(x).numpy()
    # Q/DQ exactly where hilq quantizes: only float-accumulation differences remain
    assert (y.argmax(1) == f.argmax(1)).mean() >= 0.98
    assert np.abs(y - f).max() < 0.02 * np.abs(f).max()


# ---------------------------------------------------------------- weight-only INT4

class LinearStack(nn.Module):
    """A transformer-like stack of Linear layers on (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = x + self.b(torch.nn.functional.gelu(self.a(x)))
        return self.head(x)


@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_w4a16_matmulnbits_matches_fake_quant(tmp_path, granularity):
    torch.manual_seed(0)
    model = LinearStack().eval()
    x = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1))
    cfg = variant_config(parse_variant("w4a16"), quantizable_layers(model),
                         granularity=granularity, group_size=32)
    qm = quantize(model, cfg, x)
    info = export_onnx(qm, (16, 64), tmp_path / "m.onnx", calib_x=x)
    assert {v["kernel"] for v in info["layer_map"].values()} == {"MatMulNBits"}
    m = onnx.load(tmp_path / "m.onnx")
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 3 and all(n.domain == "com.microsoft" for n in nb)
    attrs = {a.name: a.i for a in nb[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == (32 if granularity == "group" else 64)
    packed = next(i for i in m.graph.initializer if i.name == nb[0].input[1])
    assert list(packed.dims) == [128, 64 // attrs["block_size"], attrs["block_size"] // 2]
    k = _kernels(tmp_path / "m.onnx")
    assert not k["float"] and sum(d["op"] == "MatMulNBits" for d in k["detail"]) == 3
    y = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        f = qm(x).numpy()
    assert np.abs(y - f).max() <= 1e-4 * np.abs(f).max()


def test_w8a8_square_linear_on_tokens(tmp_path):
    """3-D Linear exports as MatMul with a transposed weight; square weights must not be
    mistaken for untransposed ones. ORT runs it as MatMulIntegerToFloat."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(1))
    qm = quantize(model, variant_config(parse_variant("w8a8"), quantizable_layers(model)), x)
    info = export_onnx(qm, (8, 64), tmp_path / "m.onnx", calib_x=x)
    assert {v["kernel"] for v in info["layer_map"].values()} == {"MatMulIntegerToFloat"}
    k = _kernels(tmp_path / "m.onnx")
    assert not k["float"] and len(k["integer"]) == 2, k
    y = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        f = qm(x).numpy()
    assert np.abs(y - f).max() < 0.02 * np.abs(f).max()


def test_tiny_transformer_w4a16_artifact(tmp_path):
    art = build_artifact("tiny-transformer", "w4a16", tmp_path, granularity="group",
                         group_size=64)
    layers = art.manifest["layer_map"].values()
    assert layers and all(v["kernel"] == "MatMulNBits" for v in layers)
    k = _kernels(art.path)
    assert not k["float"], k["float"]
    ref = np.load(art.path + ".reference.npz")
    y = _session(art.path).run(None, {"input": ref["input:input"]})[0]
    assert np.abs(y - ref["output:0"]).max() <= 1e-3 * np.abs(ref["output:0"]).max()


# ---------------------------------------------------------------- digits-cnn

@pytest.fixture(scope="module")
def digits_w8a8(tmp_path_factory):
    return export_digits_w8a8(tmp_path_factory.mktemp("digits"))


@pytest.mark.parametrize("precise", [False, True], ids=["ort-default", "x64quantprecision"])
def test_digits_w8a8_agrees_with_fake_quant(digits_w8a8, precise):
    qm, data, path, _ = digits_w8a8
    y = _session(path, precise).run(None, {"input": data.test_x.numpy()})[0]
    with torch.no_grad():
        f = qm(data.test_x).numpy()
    labels = data.test_y.numpy()
    top1_ort, top1_fq = (y.argmax(1) == labels).mean(), (f.argmax(1) == labels).mean()
    agree = (y.argmax(1) == f.argmax(1)).mean()
    diff = np.abs(y - f)
    print(f"digits-cnn w8a8 ORT ({'precise' if precise else 'default'}): top-1 {top1_ort:.4f} vs "
          f"fake-quant {top1_fq:.4f}; argmax agreement {agree:.4f}; |Δlogit| max "
          f"{diff.max():.4f} mean {diff.mean():.4f} (logit range ±{np.abs(f).max():.2f})")
    assert abs(top1_ort - top1_fq) <= 0.003
    assert agree >= 0.997
    assert diff.max() < 0.2 * np.abs(f).max()


def test_digits_w8a8_every_conv_is_qlinearconv(digits_w8a8):
    _, _, path, info = digits_w8a8
    n_conv = sum(v["op"] == "Conv" for v in info["layer_map"].values())
    assert n_conv == 5
    _assert_all_integer(path, n_conv)
    assert set(info["folded_activations"]) and not info["qparam_conflicts"]


def test_digits_w8a8_same_kernels_as_quantize_static(digits_w8a8, tmp_path):
    """ORT's own quantize_static (QDQ, U8 activations, S8 per-channel weights) of the same
    FP32 model fuses into the same kernel sequence as hilq's export: same work, same speed."""
    qm, data, path, _ = digits_w8a8
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(float_model(qm), (1, 8, 8), fp32)

    ref = ort_quantize_static(fp32, tmp_path / "qs.onnx", data.calib_x)
    ours = [d["op"] for d in _kernels(path)["detail"]]
    theirs = [d["op"] for d in _kernels(ref)["detail"]]
    assert ours == theirs


@pytest.mark.bench
def test_digits_w8a8_no_slower_than_quantize_static(digits_w8a8, tmp_path, benchmark):
    """Timing check (tox -e bench, a quiet machine): medians of single runs of the two
    sessions interleaved in one process (one intra-op thread each: no spinning pools),
    ratio <= 1.05."""
    import time

    test_digits_w8a8_same_kernels_as_quantize_static(digits_w8a8, tmp_path)
    _, data, path, _ = digits_w8a8
    sessions = {"hilq": _session(path, False), "ort": _session(tmp_path / "qs.onnx", False)}
    x = {"input": data.test_x[:1].numpy()}
    times = {k: [] for k in sessions}
    order = list(sessions)
    for _ in range(20):                      # warm-up
        for s in sessions.values():
            s.run(None, x)
    for _ in range(1000):                    # single runs, interleaved, order alternating
        order.reverse()
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, x)
            times[k].append(time.perf_counter() - t)
    benchmark(sessions["hilq"].run, None, x)
    ratio = np.median(times["hilq"]) / np.median(times["ort"])
    print(f"hilq / quantize_static median latency: {ratio:.3f}")
    assert ratio <= 1.05


# ---------------------------------------------------------------- artifacts

def test_build_artifact_manifest_cache_and_reference(tmp_path):
    art = build_artifact("digits-cnn", "w8a8", tmp_path)
    m = art.manifest
    for key in ("model", "variant", "bit_config", "input_shape", "input_dtype", "input_name",
                "output_names", "versions", "settings", "layer_map", "format", "sha256"):
        assert key in m, key
    assert m["model"] == "digits-cnn" and m["variant"] == "w8a8" and m["format"] == "onnx-qdq"
    assert m["input_shape"] == [1, 1, 8, 8] and m["input_dtype"] == "float32"
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert m["settings"]["act_dtype"] == "uint8" and m["settings"]["calib"] == "minmax"
    assert len(m["bit_config"]) == 6
    assert Artifact.load(art.path).sha256 == m["sha256"]
    mtime = (tmp_path / m["file"]).stat().st_mtime_ns
    again = build_artifact("digits-cnn", "w8a8", tmp_path)
    assert again.path == art.path and (tmp_path / m["file"]).stat().st_mtime_ns == mtime
    other = build_artifact("digits-cnn", "w8a8", tmp_path, seed=1)
    assert other.path != art.path
    ref = np.load(art.path + ".reference.npz")
    y = _session(art.path).run(None, {"input": ref["input:input"]})[0]
    assert (y.argmax(1) == ref["output:0"].argmax(1)).all()


def test_config_variant_keeps_unnamed_layer_float(tmp_path):
    from hilq.quant.spec import LayerPrecision, act_spec, weight_spec

    layers = ["stem.0", "block.conv1", "block.conv2", "down.0", "conv.0"]   # fc left float
    cfg = BitConfig({n: LayerPrecision(weight_spec(8), act_spec(8)) for n in layers})
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    art = build_artifact("digits-cnn", f"config:{path}", tmp_path)
    prec = {v["layer"]: v["precision"] for v in art.manifest["layer_map"].values()}
    assert prec == {**{n: "w8a8" for n in layers}, "fc": "fp32"}
    k = _kernels(art.path)
    assert k["float"] == ["/fc/Gemm"] and len(k["integer"]) >= 5


def test_fp32_artifact_has_no_qdq(tmp_path):
    art = build_artifact("digits-cnn", "fp32", tmp_path)
    assert art.manifest["format"] == "onnx-fp32" and art.manifest["bit_config"] == {}
    m = onnx.load(art.path)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    assert len(art.manifest["layer_map"]) == 6


def test_corrupt_artifact_is_a_clear_error(tmp_path):
    art = build_artifact("digits-cnn", "fp32", tmp_path)
    with open(art.path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt\x00")
    with pytest.raises(ValueError, match="corrupt"):
        Artifact.load(art.path)
    # and the cache rebuilds it instead of handing it out
    again = build_artifact("digits-cnn", "fp32", tmp_path)
    assert Artifact.load(again.path).sha256 == again.sha256


def test_bad_target_and_fp16_cpu_are_user_errors(tmp_path):
    from hilq.quant.spec import SpecError

    with pytest.raises(SpecError, match="target"):
        build_artifact("digits-cnn", "w8a8", tmp_path, target="tpu")
    with pytest.raises(SpecError, match="fp16"):
        build_artifact("digits-cnn", "fp16", tmp_path)


def test_kernels_profiling_fallback_matches(monkeypatch, digits_w8a8):
    _, _, path, _ = digits_w8a8
    want = _kernels(path)

    def no_onnx(_):
        raise ImportError("no onnx")

    monkeypatch.setattr(ort_runtime, "_optimized_ops", no_onnx)
    got = _kernels(path)
    assert got["integer"] == want["integer"] and got["float"] == want["float"]


def test_cli_export(tmp_path, capsys):
    from hilq.bench.cli import main

    out = tmp_path / "e.json"
    assert main(["export", "--model", "digits-cnn", "--variant", "w8a8", "--out",
                 str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sha256" in text and "QLinearConv" in text and "block.conv1" in text
    data = json.loads(out.read_text())
    assert data["sha256"] == Artifact.load(data["path"]).sha256
    assert main(["export", "--model", "digits-cnn", "--variant", "w9a8", "--out",
                 str(tmp_path)]) == 2


def test_artifact_file_names_fit_however_deep_the_model_path():
    """A model under a deep folder (seen under pytest-xdist's longer tmp paths) named a
    search's config file, then its artifact and reference, past the 255-byte file name limit."""
    from hilq.quant.artifact import file_stem

    deep = "/" + "/".join(f"level-{i:02d}-of-a-deep-project-tree" for i in range(12)) + "/det.onnx"
    a, b = file_stem(deep), file_stem(deep.replace("level-00", "level-99"))
    assert len(a) <= 70 and a.endswith(f"det.onnx-{a[-8:]}") and a != b
    assert file_stem("tests.user_models:tiny") == "tests.user_models_tiny"   # short: as before
    assert len(f"{a}-{file_stem('config:' + deep)}-cpu-0123456789ab.onnx.reference.npz") < 255
