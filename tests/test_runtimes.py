"""Runtimes other than ORT (OpenVINO, PyTorch CPU, PyTorch CUDA, TensorRT) on real engines,
their kernel verification, precision refusal, and `hilq runtimes`.

GPU runtimes are exercised where a GPU (and TensorRT) is present; elsewhere their pure parts
(int8/int4 quantize, pack and GEMM math on CPU, engine cache key, inspector parsing) are tested
and the rest is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hilq.devices.runtimes import NAMES, check_variant
from hilq.devices.runtimes import openvino as ov_rt
from hilq.devices.runtimes import ort as ort_rt
from hilq.devices.runtimes import tensorrt as trt_rt
from hilq.devices.runtimes import torch as torch_rt
from hilq.devices.runtimes import torch_cuda as cuda_rt
from torch import nn

SHAPE = (1, 3, 16, 16)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 16)).eval()


def calib_data(n: int = 16) -> torch.Tensor:
    return torch.randn(n, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """FP32 ONNX of the tiny CNN and ONNX Runtime's own static QDQ quantization of it
    (U8 activations, S8 per-channel weights)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    d = tmp_path_factory.mktemp("onnx")
    fp32, int8 = d / "fp32.onnx", d / "int8.onnx"
    torch.onnx.export(tiny_cnn(), (torch.randn(*SHAPE),), str(fp32), input_names=["input"],
                      output_names=["out"], dynamic_axes={"input": {0: "batch"}},
                      opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": x[None].numpy()} for x in calib_data())

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return fp32, int8


def feed() -> dict:
    return {"input": np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)}


# ------------------------------------------------------------------ OpenVINO

def test_openvino_fp32_matches_onnxruntime(onnx_files):
    fp32, _ = onnx_files
    got = ov_rt.load(str(fp32), {"threads": 2}).run(feed())[0]
    want = ort_rt.load(str(fp32), {"threads": 2}).run(feed())[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_openvino_settings_from_protocol(onnx_files):
    loaded = ov_rt.load(str(onnx_files[0]), {"threads": 1, "mode": "throughput", "batch": 3})
    assert loaded.inputs == [("input", (3, 3, 16, 16), "float32")]
    assert loaded.facts["compiled"]["INFERENCE_NUM_THREADS"] == "1"
    assert loaded.facts["compiled"]["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert loaded.facts["requested"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert loaded.facts["version"] == ov_rt.version()
    assert loaded.run({"input": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 16)
    k = loaded.kernels()
    assert not k["integer"] and len(k["float"]) == 3    # 2 convs + the linear, all f32


def test_openvino_int8_qdq_runs_convs_in_integer(onnx_files):
    fp32, int8 = onnx_files
    k = ov_rt.load(str(int8), {"threads": 2}).kernels()
    convs = [d for d in k["detail"] if d["type"] == "Convolution"]
    assert len(convs) == 2 and all(d["precision"] in ("u8", "i8") for d in convs)
    assert not k["float"], k
    got = ov_rt.load(str(int8), {"threads": 2}).run(feed())[0]
    ref = ort_rt.load(str(int8), {"threads": 2}).run(feed())[0]   # same integer model
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_openvino_refuses_precision_it_lacks(onnx_files, tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(onnx_files[0], path)
    (tmp_path / "m.onnx.manifest.json").write_text(json.dumps({"variant": "w4a4"}))
    with pytest.raises(ValueError, match="does not run 'w4a4'"):
        ov_rt.load(str(path), {})
    with pytest.raises(ValueError, match="does not run 'w2a8'"):
        ov_rt.load(str(onnx_files[0]), {"variant": "w2a8"})


def test_openvino_reads_matmulnbits_as_int4_weights(tmp_path):
    """w4a16 = ONNX Runtime's MatMulNBits (4-bit blocks along K); OpenVINO runs it as a
    FullyConnected with u4 weights and must agree with ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    k, n, block = 64, 16, 32
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    scales = (rng.random(n * k // block) * 0.1 + 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor("w", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
         helper.make_tensor("s", TensorProto.FLOAT, scales.shape, scales)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    path = tmp_path / "nbits.onnx"
    onnx.save(model, path)
    x = {"x": rng.standard_normal((1, k)).astype(np.float32)}
    loaded = ov_rt.load(str(path), {"variant": "w4a16", "threads": 2})
    want = ort_rt.load(str(path), {}).run(x)[0]
    np.testing.assert_allclose(loaded.run(x)[0], want, rtol=1e-3, atol=1e-3)
    k4 = loaded.kernels()
    assert k4["integer"] and not k4["float"]
    assert k4["detail"][0]["precision"] in ("u4", "i4")


# ------------------------------------------------------------------ PyTorch CPU

@pytest.fixture
def restore_torch_state():
    """The runtime sets process-wide torch state (one artifact per process on a device)."""
    import torch._inductor.config as ic

    threads, freezing = torch.get_num_threads(), ic.freezing
    yield
    torch.set_num_threads(threads)
    ic.freezing = freezing
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def pt2_files(tmp_path_factory):
    from hilq.quant.export_torch import export_module

    d = tmp_path_factory.mktemp("pt2")
    out = {}
    for variant in ("fp32", "w8a8"):
        out[variant] = d / f"cnn-{variant}.pt2"
        settings = export_module(tiny_cnn(), variant, calib_data(), out[variant])
        assert settings["dynamic_batch"] and settings["bn_folded"]
        (d / f"cnn-{variant}.pt2.manifest.json").write_text(json.dumps({"variant": variant}))
    return out


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_torch_fp32_matches_float_model(pt2_files, mode, restore_torch_state):
    loaded = torch_rt.load(str(pt2_files["fp32"]), {"threads": 2, "runtime_options": {"mode": mode}})
    x = feed()["input"]
    want = tiny_cnn()(torch.from_numpy(x)).detach().numpy()
    got = loaded.run({loaded.inputs[0][0]: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert loaded.facts["mode"] == mode and loaded.facts["threads"] == 2
    k = loaded.kernels()
    assert not k["integer"] and k["float"] and k["source_layers"] == {"conv": 2, "linear": 1}


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_torch_w8a8_agrees_and_reports_kernels(pt2_files, mode, restore_torch_state):
    loaded = torch_rt.load(str(pt2_files["w8a8"]), {"threads": 2, "runtime_options": {"mode": mode},
                                                    "batch": 8})
    x = calib_data(8).numpy()
    want = tiny_cnn()(torch.from_numpy(x)).detach().numpy()
    got = loaded.run({loaded.inputs[0][0]: x})[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    k = loaded.kernels()
    if mode == "compile":  # inductor fused Q/DQ + conv into oneDNN int8 kernels
        assert sum("qconv" in n for n in k["integer"]) == 2
        assert sum("qlinear" in n for n in k["integer"]) == 1 and not k["float"], k
    else:  # the PT2E reference graph runs float convs on dequantized tensors: degraded
        assert not k["integer"] and {"0", "3"} <= set(k["float"])


def test_torch_refuses_precision_it_lacks(pt2_files, tmp_path):
    path = tmp_path / "m.pt2"
    shutil.copy(pt2_files["fp32"], path)
    (tmp_path / "m.pt2.manifest.json").write_text(json.dumps({"variant": "w4a16"}))
    with pytest.raises(ValueError, match="does not run 'w4a16'"):
        torch_rt.load(str(path), {})
    with pytest.raises(ValueError, match="torch mode"):
        torch_rt.load(str(pt2_files["fp32"]), {"runtime_options": {"mode": "jit"}})
    (tmp_path / "m.pt2.manifest.json").write_text(json.dumps(
        {"variant": "w8a8", "settings": {"quantized_at_load": True}}))
    with pytest.raises(ValueError, match="applied by the torch-cuda runtime"):
        torch_rt.load(str(path), {})


def test_export_torch_build_writes_manifest(tmp_path, monkeypatch, restore_torch_state):
    from hilq.quant.artifact import Artifact
    from hilq.quant.export_torch import build

    art = build("digits-cnn", "fp32", tmp_path)
    m = Artifact.load(art.path).manifest
    assert m["format"] == "torch-export" and m["variant"] == "fp32"
    assert m["input_shape"] == [1, 1, 8, 8] and m["versions"]["torch"] == torch.__version__
    assert m["runtimes"] == ["torch"] and m["settings"]["bn_folded"]
    loaded = torch_rt.load(art.path, {"runtime_options": {"mode": "eager"}, "batch": 2})
    assert loaded.run({loaded.inputs[0][0]: np.zeros((2, 1, 8, 8), np.float32)})[0].shape \
        == (2, 10)
    with pytest.raises(ValueError, match="supports fp32, w8a8"):
        build("digits-cnn", "w4a16", tmp_path)


# ------------------------------------------------------------------ PyTorch CUDA (pure parts)

def test_int8_gemm_matches_float_on_cpu():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 37, generator=g), torch.randn(24, 37, generator=g)
    b = torch.randn(24, generator=g)
    wq, ws = cuda_rt.quantize_int8_weight(w)
    assert wq.dtype == torch.int8 and wq.shape == (24, 40)  # K padded to a multiple of 8
    y = cuda_rt.int8_gemm(x, wq, ws, b)
    ref = x @ w.T + b
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()


def test_int4_pack_round_trip_and_gemm_on_cpu():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 200, generator=g)
    q, sz = cuda_rt.quantize_int4_groups(w)
    assert q.shape == (16, 256) and sz.shape == (2, 16, 2) and int(q.max()) <= 15
    deq = cuda_rt.dequantize_int4_groups(q, sz)[:, :200]
    scale = sz[..., 0].float().max()
    assert (deq - w).abs().max() <= scale * 0.55     # half a step, plus bf16 rounding
    x = torch.randn(3, 200, generator=g)
    y = cuda_rt.int4_gemm(x, cuda_rt.pack_int4(q), sz, 256).float()
    ref = x.to(torch.bfloat16).float() @ deq.T
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("kind,tol", [("w8a8", 0.02), ("w4a16", 0.1)])
def test_torch_cuda_program_rewrite_on_cpu(kind, tol):
    """The rewrite the GPU runtime applies, run on CPU: convs (3x3 via im2col, 1x1 via
    reshape) and linears become int kernels; a grouped conv and N % 8 != 0 stay float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16),
                          nn.Linear(16, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = torch.export.export(model, (x,)).module()
    integer, floats = cuda_rt.quantize_program(gm, kind)
    assert integer == ["0", "2", "6"] and floats == ["3", "7"]
    ref = model(x)
    assert (gm(x).float() - ref).abs().max() < tol * ref.abs().max()


def test_to_device_casts_constants_but_not_kernel_scales():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) * torch.tensor([2.0])   # a plain tensor constant in the program

    gm = torch.export.export(M(), (torch.randn(2, 16),)).module()
    assert cuda_rt.quantize_program(gm, "w8a8") == (["fc"], [])
    cuda_rt.to_device(gm, torch.device("cpu"), torch.float16)
    consts = [v for v in vars(gm).values() if isinstance(v, torch.Tensor)]
    assert consts and all(c.dtype == torch.float16 for c in consts)
    assert gm._hilq_w8a8_0.gemm.w_scale.dtype == torch.float32
    assert gm(torch.randn(2, 16).half()).dtype == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_torch_cuda_says_why_it_is_unavailable():
    with pytest.raises(ImportError, match="no CUDA GPU"):
        cuda_rt.version()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch-cuda needs an NVIDIA GPU; "
                    "none here (its CPU-testable math is tested above)")
@pytest.mark.parametrize("variant", ["fp16", "w8a8", "w4a16"])
def test_torch_cuda_runs_on_gpu(variant, tmp_path):
    from hilq.quant.export_torch import export_module

    path = tmp_path / f"cnn-{variant}.pt2"
    export_module(tiny_cnn(), variant, calib_data(), path, device="cuda")
    loaded = cuda_rt.load(str(path), {"variant": variant})
    x = feed()["input"]
    want = tiny_cnn()(torch.from_numpy(x)).detach().numpy()
    got = loaded.run({loaded.inputs[0][0]: x})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    loaded.device_timer.start()
    loaded.run({loaded.inputs[0][0]: x})
    assert loaded.device_timer.stop() > 0
    if variant != "fp16":
        assert len(loaded.kernels()["integer"]) >= 2


# ------------------------------------------------------------------ TensorRT (pure parts)

def test_engine_cache_key_changes_with_every_input():
    base = ("ab" * 32, "10.9.0", "NVIDIA H100", "9.0", {"strongly_typed": True})
    key = trt_rt.engine_cache_key(*base)
    assert key == trt_rt.engine_cache_key(*base) and len(key) == 32
    for i, other in enumerate(("cd" * 32, "11.0.0", "NVIDIA L4", "8.9",
                               {"strongly_typed": False})):
        changed = list(base)
        changed[i] = other
        assert trt_rt.engine_cache_key(*changed) != key


def test_builder_settings_fp16_baseline_and_strong_typing():
    fp16 = trt_rt.builder_settings("fp16", {"batch": 4})
    assert fp16["fp16_flag"] and not fp16["strongly_typed"] and fp16["batch"] == 4
    int8 = trt_rt.builder_settings("w8a8", {})
    assert int8["strongly_typed"] and not int8["fp16_flag"]
    assert trt_rt.builder_settings("fp16", {}, onnx_is_fp16=True)["strongly_typed"]
    mixed = trt_rt.builder_settings("w8a8", {"runtime_options": {"fp16_rest": True}})
    assert not mixed["strongly_typed"] and mixed["fp16_flag"] and mixed["int8_flag"]
    with pytest.raises(ValueError, match="does not run 'w4a4'"):
        check_variant("tensorrt", "w4a4", trt_rt.precisions())


def test_inspector_json_classification():
    info = {"Layers": [
        {"Name": "/conv1/Conv + /relu/Relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where "
                     "channel % 32 == 0"}],
         "Outputs": [{"Name": "y", "Format/Datatype": "Channel major INT8 format"}]},
        {"Name": "/fc/Gemm", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /conv1/Conv",
         "LayerType": "Reformat", "Inputs": [], "Outputs": []},
        {"Name": "/pool/GlobalAveragePool", "LayerType": "CaskPooling", "Inputs": []},
        "/conv2/Conv"]}
    k = trt_rt.classify_layers(info)
    assert k == {"integer": ["/conv1/Conv + /relu/Relu"], "float": ["/fc/Gemm"],
                 "unverified": ["/conv2/Conv"]}


def test_tensorrt_absent_is_an_import_error():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            trt_rt.version()
    else:
        if not torch.cuda.is_available():
            with pytest.raises(ImportError, match="no CUDA GPU"):
                trt_rt.version()


@pytest.mark.gpu
def test_tensorrt_builds_and_runs_int8(onnx_files, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (no wheel host)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU")
    _, int8 = onnx_files
    proto = {"runtime_options": {"engine_cache": str(tmp_path)}, "variant": "w8a8"}
    loaded = trt_rt.load(str(int8), proto)
    got = loaded.run(feed())[0]
    want = ort_rt.load(str(int8), {}).run(feed())[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 1e-3
    assert loaded.kernels()["integer"] and not loaded.facts["engine_cached"]
    assert trt_rt.load(str(int8), proto).facts["engine_cached"]


# ------------------------------------------------------------------ hilq runtimes

def test_hilq_runtimes_lists_every_runtime(tmp_path, capsys):
    from hilq.bench.cli import main

    out = tmp_path / "rt.json"
    assert main(["runtimes", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["runtimes"]}
    assert set(rows) == set(NAMES)
    for name in ("ort", "openvino", "torch"):
        assert rows[name]["available"] and rows[name]["version"]
        assert "w8a8" in rows[name]["precisions"]["conv"]
    if not torch.cuda.is_available():
        assert not rows["torch-cuda"]["available"]
        assert rows["torch-cuda"]["reason"].startswith("not available:")
    printed = capsys.readouterr().out
    assert "openvino" in printed and "tensorrt" in printed


# ------------------------------------------------------------------ the side-by-side script

@pytest.mark.slow
def test_bench_runtimes_script_smoke(tmp_path, capsys, monkeypatch):
    """The must-show benchmark end to end on a tiny model with tiny durations (numbers
    meaningless): builds hilq's and the peer's files, times each case in its own agent
    process plus the independent ORT timer, prints the table and the target lines."""
    from experiments import bench_runtimes as mod

    out = tmp_path / "raw.json"
    assert mod.main(["--model", "digits-cnn", "--transformer", "none", "--no-torch",
                     "--rounds", "1", "--warmup", "1", "--min-iters", "3", "--min-s", "0",
                     "--out", str(tmp_path), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "digits-cnn peer W8A8 (ORT quantize_static) · ort" in table
    assert "hilq W8A8 on ORT / peer" in table and "CPU flags:" in table
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 6 and all(c["rounds"][0]["status"] != "failed" for c in cases)
    assert all(c["independent_p50_ms"] for c in cases if c["runtime"] == "ort")
